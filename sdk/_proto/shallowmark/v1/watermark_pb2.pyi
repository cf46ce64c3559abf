import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateSource(_message.Message):
    __slots__ = ("prompt", "seed")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    seed: int
    def __init__(self, prompt: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("generate", "image", "method", "model", "method_key", "output")
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_KEY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    generate: GenerateSource
    image: bytes
    method: str
    model: str
    method_key: bytes
    output: str
    def __init__(self, generate: _Optional[_Union[GenerateSource, _Mapping]] = ..., image: _Optional[bytes] = ..., method: _Optional[str] = ..., model: _Optional[str] = ..., method_key: _Optional[bytes] = ..., output: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("image", "key_id", "method", "model", "image_sha256", "request_id", "notes", "model_evals")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_EVALS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    key_id: str
    method: str
    model: str
    image_sha256: str
    request_id: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    model_evals: int
    def __init__(self, image: _Optional[bytes] = ..., key_id: _Optional[str] = ..., method: _Optional[str] = ..., model: _Optional[str] = ..., image_sha256: _Optional[str] = ..., request_id: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., model_evals: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("image", "method_keys", "target_fpr", "model", "nonce")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METHOD_KEYS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FPR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    method_keys: _containers.RepeatedScalarFieldContainer[bytes]
    target_fpr: float
    model: str
    nonce: bytes
    def __init__(self, image: _Optional[bytes] = ..., method_keys: _Optional[_Iterable[bytes]] = ..., target_fpr: _Optional[float] = ..., model: _Optional[str] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class KeyVerdict(_message.Message):
    __slots__ = ("key_id", "method", "score", "p_value", "p_value_corrected", "detected", "family_size", "member", "member_key_id")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_CORRECTED_FIELD_NUMBER: _ClassVar[int]
    DETECTED_FIELD_NUMBER: _ClassVar[int]
    FAMILY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    MEMBER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    method: str
    score: float
    p_value: float
    p_value_corrected: float
    detected: bool
    family_size: int
    member: int
    member_key_id: str
    def __init__(self, key_id: _Optional[str] = ..., method: _Optional[str] = ..., score: _Optional[float] = ..., p_value: _Optional[float] = ..., p_value_corrected: _Optional[float] = ..., detected: _Optional[bool] = ..., family_size: _Optional[int] = ..., member: _Optional[int] = ..., member_key_id: _Optional[str] = ...) -> None: ...

class Attestation(_message.Message):
    __slots__ = ("payload", "signature", "public_key", "payload_format")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    signature: bytes
    public_key: bytes
    payload_format: str
    def __init__(self, payload: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., public_key: _Optional[bytes] = ..., payload_format: _Optional[str] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("verdicts", "detected", "identified_key_id", "bits", "num_bits", "method_score", "target_fpr", "model", "image_sha256", "request_id", "notes", "model_evals", "attestation", "identified_member")
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    DETECTED_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIED_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    NUM_BITS_FIELD_NUMBER: _ClassVar[int]
    METHOD_SCORE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FPR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_EVALS_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIED_MEMBER_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[KeyVerdict]
    detected: bool
    identified_key_id: str
    bits: bytes
    num_bits: int
    method_score: float
    target_fpr: float
    model: str
    image_sha256: str
    request_id: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    model_evals: int
    attestation: Attestation
    identified_member: int
    def __init__(self, verdicts: _Optional[_Iterable[_Union[KeyVerdict, _Mapping]]] = ..., detected: _Optional[bool] = ..., identified_key_id: _Optional[str] = ..., bits: _Optional[bytes] = ..., num_bits: _Optional[int] = ..., method_score: _Optional[float] = ..., target_fpr: _Optional[float] = ..., model: _Optional[str] = ..., image_sha256: _Optional[str] = ..., request_id: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., model_evals: _Optional[int] = ..., attestation: _Optional[_Union[Attestation, _Mapping]] = ..., identified_member: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "image_size", "latent_shape", "conditional", "loaded")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CONDITIONAL_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    name: str
    image_size: int
    latent_shape: _containers.RepeatedScalarFieldContainer[int]
    conditional: bool
    loaded: bool
    def __init__(self, name: _Optional[str] = ..., image_size: _Optional[int] = ..., latent_shape: _Optional[_Iterable[int]] = ..., conditional: _Optional[bool] = ..., loaded: _Optional[bool] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "supports_embed", "generate_model_evals", "embed_model_evals", "verify_model_evals")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_EMBED_FIELD_NUMBER: _ClassVar[int]
    GENERATE_MODEL_EVALS_FIELD_NUMBER: _ClassVar[int]
    EMBED_MODEL_EVALS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MODEL_EVALS_FIELD_NUMBER: _ClassVar[int]
    name: str
    supports_embed: bool
    generate_model_evals: int
    embed_model_evals: int
    verify_model_evals: int
    def __init__(self, name: _Optional[str] = ..., supports_embed: _Optional[bool] = ..., generate_model_evals: _Optional[int] = ..., embed_model_evals: _Optional[int] = ..., verify_model_evals: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_image_pixels", "max_message_bytes", "max_batch", "max_keys_per_verify")
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_KEYS_PER_VERIFY_FIELD_NUMBER: _ClassVar[int]
    max_image_pixels: int
    max_message_bytes: int
    max_batch: int
    max_keys_per_verify: int
    def __init__(self, max_image_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_keys_per_verify: _Optional[int] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("models", "methods", "limits", "default_model", "attestation_public_key", "server_version", "tenant")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    limits: Limits
    default_model: str
    attestation_public_key: bytes
    server_version: str
    tenant: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., default_model: _Optional[str] = ..., attestation_public_key: _Optional[bytes] = ..., server_version: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class ListEmbedsRequest(_message.Message):
    __slots__ = ("tenant", "key_id", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    key_id: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., key_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("tenant", "key_id", "method", "model", "image_sha256", "created_at", "request_id", "source")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    key_id: str
    method: str
    model: str
    image_sha256: str
    created_at: _timestamp_pb2.Timestamp
    request_id: str
    source: str
    def __init__(self, tenant: _Optional[str] = ..., key_id: _Optional[str] = ..., method: _Optional[str] = ..., model: _Optional[str] = ..., image_sha256: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ListEmbedsResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
