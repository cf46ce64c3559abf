#!/usr/bin/env node
// Verify an image with a shallowmark server from Node.js, using the committed proto
// (protos/shallowmark/v1/watermark.proto, loaded at run time: no code generation step).
//
//   npm ci                                   # in examples/node (or: npm install)
//   export SHALLOWMARK_TOKEN=...             # bearer token the server maps to your tenant
//   node verify.js --trusted-key SERVER_KEY IMAGE.png KEY.smk [KEY.smk ...]
//
// --trusted-key is required: the server's Ed25519 attestation public key you pinned (stored from
// GetInfo's attestation_public_key at deployment, from your operator, or the one `shallowmark serve`
// prints), as base64 or hex of the 32 raw bytes, or a file holding it (PEM, raw, base64 or hex).
// A key fetched in the same run would prove nothing about who signed, so none is taken from GetInfo.
//
// KEY.smk files hold *method keys*, never master keys: the bytes of `MethodKey.to_bytes()` from the
// Python SDK (raw, starting with "SMK1", or base64 of them), e.g.
//   Path("key.smk").write_bytes(keystore.active().for_method("shallow-diffuse").to_bytes())
//
// Environment: SHALLOWMARK_SERVER (default 127.0.0.1:50051), SHALLOWMARK_TOKEN, SHALLOWMARK_CA
// (PEM of the server's CA: turns TLS on), SHALLOWMARK_TARGET_FPR (default 0.01).
//
// The attestation is checked before anything is reported: payload format shallowmark.verify.v2, an
// Ed25519 signature valid for the pinned key, the signed image_sha256 equal to the SHA-256 of the
// file sent, the signed nonce equal to the random one this run sent (no replayed attestation), and
// the signed verdicts equal to the response's. Prints one JSON object: the server info and the
// verdicts as signed. Exit status: 0 done, 1 usage, 2 RPC error, 3 the attestation does not check out
// (then the JSON carries attestation_valid: false and attestation_error, and no verdicts).
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.join(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'shallowmark/v1/watermark.proto';
const ED25519_SPKI_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

function loadService() {
  const def = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true,       // field names exactly as in the proto (image_sha256, method_keys, ...)
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(def).shallowmark.v1.Watermark;
}

function readMethodKey(file) {
  const raw = fs.readFileSync(file);
  if (raw.subarray(0, 4).toString('latin1') === 'SMK1') return raw;
  const decoded = Buffer.from(raw.toString('ascii').trim(), 'base64');
  if (decoded.subarray(0, 4).toString('latin1') !== 'SMK1') {
    throw new Error(`${file} is not a method key (MethodKey.to_bytes(), raw or base64)`);
  }
  return decoded;
}

function call(client, method, request, metadata, timeoutS) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutS * 1000);
    client[method](request, metadata, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

const PAYLOAD_FORMAT = 'shallowmark.verify.v2';

// The pinned key as a KeyObject: base64 or hex of the 32 raw bytes, or a file holding it (PEM, raw,
// base64 or hex). Throws with a message naming --trusted-key.
function loadTrustedKey(value) {
  let data = value;
  if (fs.existsSync(value) && fs.statSync(value).isFile()) {
    const raw = fs.readFileSync(value);
    if (raw.toString('latin1').includes('-----BEGIN')) {
      const key = crypto.createPublicKey(raw);
      if (key.asymmetricKeyType !== 'ed25519') throw new Error(`--trusted-key ${value}: not an Ed25519 key`);
      return key;
    }
    if (raw.length === 32) data = raw;
    else data = raw.toString('ascii').trim();
  }
  let bytes = data;
  if (typeof data === 'string') {
    bytes = /^[0-9a-fA-F]{64}$/.test(data) ? Buffer.from(data, 'hex') : Buffer.from(data, 'base64');
  }
  if (bytes.length !== 32) {
    throw new Error('--trusted-key: an Ed25519 public key is 32 raw bytes (base64, hex, or a PEM/raw file); '
                    + `got ${bytes.length} bytes`);
  }
  return crypto.createPublicKey({ key: Buffer.concat([ED25519_SPKI_PREFIX, bytes]), format: 'der', type: 'spki' });
}

function rawKey(keyObject) {
  return keyObject.export({ format: 'der', type: 'spki' }).subarray(ED25519_SPKI_PREFIX.length);
}

// Throws an Error saying what does not check out; returns the signed payload otherwise.
function checkAttestation(att, trustedKey, { imageSha256, nonce, response }) {
  if (!att || !att.payload || att.payload.length === 0 || !att.signature || att.signature.length === 0) {
    throw new Error('the result carries no attestation');
  }
  if (att.payload_format !== PAYLOAD_FORMAT) {
    throw new Error(`unknown attestation payload format ${JSON.stringify(att.payload_format)}; expected ${PAYLOAD_FORMAT}`);
  }
  const carried = Buffer.from(att.public_key || []);
  if (carried.length > 0 && !carried.equals(rawKey(trustedKey))) {
    throw new Error('the result was signed by a different key than the trusted one');
  }
  if (!crypto.verify(null, Buffer.from(att.payload), trustedKey, Buffer.from(att.signature))) {
    throw new Error('invalid signature: the payload was altered or not signed by the trusted key');
  }
  let payload;
  try {
    payload = JSON.parse(Buffer.from(att.payload).toString('utf8'));
  } catch (e) {
    throw new Error('the attestation payload is not JSON');
  }
  if (!payload || payload.format !== PAYLOAD_FORMAT) throw new Error(`the payload is not a ${PAYLOAD_FORMAT} object`);
  if (payload.image_sha256 !== imageSha256) {
    throw new Error('the signed image_sha256 is not the SHA-256 of the image sent');
  }
  if (payload.nonce !== Buffer.from(nonce).toString('hex')) {
    throw new Error('the signed nonce is not the one this call sent (a replayed attestation?)');
  }
  if (response) {
    const same = payload.request_id === response.request_id && payload.detected === response.detected
      && payload.identified_key_id === (response.identified_key_id || '')
      && payload.image_sha256 === response.image_sha256
      && Array.isArray(payload.verdicts) && payload.verdicts.length === response.verdicts.length
      // set only when a member was found by searching a key family (proto3 optional: absent otherwise)
      && ('identified_member' in payload) === (response.identified_member != null)
      && (payload.identified_member == null || String(payload.identified_member) === String(response.identified_member))
      && payload.verdicts.every((v, i) => v.key_id === response.verdicts[i].key_id
        && v.detected === response.verdicts[i].detected && v.p_value === response.verdicts[i].p_value
        // a key family's verdict signs its size, best member and that member's id; a single key's none
        && (response.verdicts[i].family_size
          ? v.family_size === response.verdicts[i].family_size && v.member === response.verdicts[i].member
            && v.member_key_id === response.verdicts[i].member_key_id
          : !('member' in v)));
    if (!same) throw new Error('the signed payload does not match the response');
  }
  return payload;
}

function parseArgs(argv) {
  const rest = [];
  let trustedKey = null;
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '--trusted-key') {
      trustedKey = argv[i + 1] === undefined ? '' : argv[i + 1];
      i += 1;
    } else if (argv[i].startsWith('--trusted-key=')) {
      trustedKey = argv[i].slice('--trusted-key='.length);
    } else {
      rest.push(argv[i]);
    }
  }
  return { trustedKey, rest };
}

const USAGE = 'usage: node verify.js --trusted-key SERVER_KEY IMAGE KEY.smk [KEY.smk ...]\n'
  + '  SERVER_KEY: the pinned attestation public key (base64 or hex of 32 bytes, or a PEM/raw file);\n'
  + '  token in $SHALLOWMARK_TOKEN';

async function main(argv) {
  const { trustedKey: trustedArg, rest } = parseArgs(argv);
  if (!trustedArg) {
    console.error('shallowmark: --trusted-key is required: the server attestation public key you pinned '
                  + '(refusing to trust a key fetched in this run)');
    console.error(USAGE);
    return 1;
  }
  if (rest.length < 2) {
    console.error(USAGE);
    return 1;
  }
  let trustedKey;
  try {
    trustedKey = loadTrustedKey(trustedArg);
  } catch (err) {
    console.error(`shallowmark: ${err.message}`);
    return 1;
  }
  const [imagePath, ...keyFiles] = rest;
  const address = process.env.SHALLOWMARK_SERVER || '127.0.0.1:50051';
  const token = process.env.SHALLOWMARK_TOKEN || '';
  const creds = process.env.SHALLOWMARK_CA
    ? grpc.credentials.createSsl(fs.readFileSync(process.env.SHALLOWMARK_CA))
    : grpc.credentials.createInsecure();
  const Watermark = loadService();
  const client = new Watermark(address, creds, {
    'grpc.max_send_message_length': 64 * 1024 * 1024,
    'grpc.max_receive_message_length': 64 * 1024 * 1024,
  });
  const metadata = new grpc.Metadata();
  if (token) metadata.set('authorization', `Bearer ${token}`);

  try {
    const info = await call(client, 'GetInfo', {}, metadata, 30);
    const image = fs.readFileSync(imagePath);
    const nonce = crypto.randomBytes(16);   // signed back in the attestation: proves it is this call's
    const request = {
      image,
      method_keys: keyFiles.map(readMethodKey),
      target_fpr: Number(process.env.SHALLOWMARK_TARGET_FPR || 0.01),
      nonce,
    };
    const res = await call(client, 'Verify', request, metadata, 300);
    const imageSha256 = crypto.createHash('sha256').update(image).digest('hex');
    const out = { server_version: info.server_version, tenant: info.tenant, models: info.models.map((m) => m.name) };
    let payload;
    try {
      payload = checkAttestation(res.attestation, trustedKey, { imageSha256, nonce, response: res });
    } catch (err) {
      console.log(JSON.stringify({ ...out, request_id: res.request_id, attestation_valid: false,
                                   attestation_error: err.message }));
      console.error(`shallowmark: attestation refused: ${err.message}`);
      return 3;
    }
    // everything below is what the server signed
    console.log(JSON.stringify({
      ...out,
      detected: payload.detected,
      identified_key_id: payload.identified_key_id || null,
      verdicts: payload.verdicts.map((v) => ({
        key_id: v.key_id, method: v.method, p_value: v.p_value, p_value_corrected: v.p_value_corrected,
        detected: v.detected,
      })),
      image_sha256: payload.image_sha256,
      request_id: payload.request_id,
      tenant_signed: payload.tenant,
      issued_at: payload.issued_at,
      attestation_valid: true,
    }));
    return 0;
  } catch (err) {
    const code = err.code !== undefined ? (Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || err.code) : '';
    console.error(`shallowmark: ${code}: ${err.details || err.message}`);
    return 2;
  } finally {
    client.close();
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((status) => { process.exitCode = status; });
}

module.exports = { checkAttestation, loadTrustedKey, PAYLOAD_FORMAT };
