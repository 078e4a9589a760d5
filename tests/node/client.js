// A Node client of Esper built from generated/esper.protoset alone (no Python, no proto/).
//
//   node client.js <host:port> <api key> <path to esper.protoset>
//
// 1. loads the descriptor set with @grpc/proto-loader and calls TamiyoService.GetPolicyInfo;
// 2. sends an invalid Decide and decodes the error's google.rpc.Status details
//    (ErrorInfo, BadRequest) from the grpc-status-details-bin trailer with protobufjs;
// 3. calls grpc.health.v1.Health/Check.
// Prints one JSON object per step on stdout; exits non-zero on anything unexpected.
"use strict";

const fs = require("fs");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");
const descriptor = require("protobufjs/ext/descriptor");

const [target, apiKey, protosetPath] = process.argv.slice(2);
if (!target || !apiKey || !protosetPath) {
  console.error("usage: node client.js <host:port> <api key> <esper.protoset>");
  process.exit(2);
}

const protoset = fs.readFileSync(protosetPath);
const definition = protoLoader.loadFileDescriptorSetFromBuffer(protoset, {
  keepCase: true, longs: String, enums: String, defaults: false, oneofs: true,
});
const pkg = grpc.loadPackageDefinition(definition);
// The same set, for decoding the bytes of error details (google.rpc.Status and its Anys).
const root = protobuf.Root.fromDescriptor(descriptor.FileDescriptorSet.decode(protoset));
const Status = root.lookupType("google.rpc.Status");

const credentials = grpc.credentials.createInsecure();
const tamiyo = new pkg.esper.tamiyo.v1.TamiyoService(target, credentials);
const health = new pkg.grpc.health.v1.Health(target, credentials);

function metadata() {
  const md = new grpc.Metadata();
  md.set("x-api-key", apiKey);
  return md;
}

function deadline() {
  return { deadline: new Date(Date.now() + 10000) };
}

function call(client, method, request, md) {
  return new Promise((resolve, reject) => {
    client[method](request, md, deadline(), (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

function details(err) {
  const raw = err.metadata.get("grpc-status-details-bin")[0];
  if (!raw) return null;
  const status = Status.decode(raw);
  return {
    code: status.code,
    message: status.message,
    details: status.details.map((any) => {
      const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
      const type = root.lookupType(typeName);
      const value = type.toObject(type.decode(any.value), { longs: String });
      // Root.fromDescriptor turns map fields into repeated {key, value} entries.
      if (Array.isArray(value.metadata)) {
        value.metadata = Object.fromEntries(value.metadata.map((e) => [e.key, e.value]));
      }
      return { type: typeName, value };
    }),
  };
}

async function main() {
  const info = await call(tamiyo, "GetPolicyInfo", {}, metadata());
  console.log(JSON.stringify({ step: "GetPolicyInfo", policy: info.policy, version: info.policy_version }));

  try {
    await call(tamiyo, "Decide", { request_id: "not-a-uuid" }, metadata());
    throw new Error("an invalid Decide succeeded");
  } catch (err) {
    if (err.code === undefined) throw err;
    console.log(JSON.stringify({ step: "Decide", code: grpc.status[err.code], status: details(err) }));
  }

  try {
    await call(tamiyo, "GetPolicyInfo", {}, new grpc.Metadata());
    throw new Error("a call without a key succeeded");
  } catch (err) {
    if (err.code === undefined) throw err;
    console.log(JSON.stringify({ step: "NoKey", code: grpc.status[err.code], status: details(err) }));
  }

  const h = await call(health, "Check", { service: "esper.tamiyo.v1.TamiyoService" }, new grpc.Metadata());
  console.log(JSON.stringify({ step: "Health", status: h.status }));
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err && err.stack ? err.stack : err);
    process.exit(1);
  },
);
