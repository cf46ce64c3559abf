#!/usr/bin/env node
// Verify an image with a shallowmark server from Node.js, using the committed proto
// (protos/shallowmark/v1/watermark.proto, loaded at run time: no code generation step).
//
//   npm ci                                   # in examples/node (or: npm install)
//   export SHALLOWMARK_TOKEN=...             # bearer token the server maps to your tenant
//   node verify.js IMAGE.png KEY.smk [KEY.smk ...]
//
// KEY.smk files hold *method keys*, never master keys: the bytes of `MethodKey.to_bytes()` from the
// Python SDK (raw, starting with "SMK1", or base64 of them), e.g.
//   Path("key.smk").write_bytes(keystore.active().for_method("shallow-diffuse").to_bytes())
//
// Environment: SHALLOWMARK_SERVER (default 127.0.0.1:50051), SHALLOWMARK_TOKEN, SHALLOWMARK_CA
// (PEM of the server's CA: turns TLS on), SHALLOWMARK_TARGET_FPR (default 0.01).
// Prints one JSON object: the server info, the verdicts, and whether the Ed25519 attestation over
// the result checks out with the key GetInfo reported. Exit status: 0 done, 1 usage, 2 RPC error.
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

function attestationValid(att, trustedKey) {
  if (!att || !att.payload || att.payload.length === 0) return false;
  if (!Buffer.from(att.public_key).equals(Buffer.from(trustedKey))) return false;
  const key = crypto.createPublicKey({
    key: Buffer.concat([ED25519_SPKI_PREFIX, Buffer.from(att.public_key)]), format: 'der', type: 'spki',
  });
  return crypto.verify(null, Buffer.from(att.payload), key, Buffer.from(att.signature));
}

async function main(argv) {
  if (argv.length < 2) {
    console.error('usage: node verify.js IMAGE KEY.smk [KEY.smk ...]  (token in $SHALLOWMARK_TOKEN)');
    return 1;
  }
  const [imagePath, ...keyFiles] = argv;
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
    const request = {
      image: fs.readFileSync(imagePath),
      method_keys: keyFiles.map(readMethodKey),
      target_fpr: Number(process.env.SHALLOWMARK_TARGET_FPR || 0.01),
    };
    const res = await call(client, 'Verify', request, metadata, 300);
    console.log(JSON.stringify({
      server_version: info.server_version,
      tenant: info.tenant,
      models: info.models.map((m) => m.name),
      detected: res.detected,
      identified_key_id: res.identified_key_id || null,
      verdicts: res.verdicts.map((v) => ({
        key_id: v.key_id, method: v.method, p_value: v.p_value, p_value_corrected: v.p_value_corrected,
        detected: v.detected,
      })),
      image_sha256: res.image_sha256,
      request_id: res.request_id,
      attestation_valid: attestationValid(res.attestation, info.attestation_public_key),
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

main(process.argv.slice(2)).then((status) => { process.exitCode = status; });
