// A Node.js client of the rag.v1 contract, straight from proto/ (no generated
// code): prints one JSON line per call for tests/test_envoy.py to check.
//
//   node client.js TARGET CERTS_DIR   (TLS with a client certificate from CERTS_DIR)
"use strict";
const path = require("path");
const fs = require("fs");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, certs] = process.argv.slice(2);
const protoDir = path.resolve(__dirname, "..", "..", "proto");
const definition = protoLoader.loadSync(
  ["rag/v1/retrieval_service.proto", "rag/v1/admin_service.proto"],
  { includeDirs: [protoDir], keepCase: true, longs: Number, defaults: true },
);
const rag = grpc.loadPackageDefinition(definition).rag.v1;
const credentials = grpc.credentials.createSsl(
  fs.readFileSync(path.join(certs, "ca.pem")),
  fs.readFileSync(path.join(certs, "client.key")),
  fs.readFileSync(path.join(certs, "client.pem")),
);
const retrieval = new rag.RetrievalService(target, credentials);
const admin = new rag.AdminService(target, credentials);
const deadline = () => new Date(Date.now() + 20000);

function call(client, method, request) {
  return new Promise((resolve) => {
    client[method](request, { deadline: deadline() }, (error, response) => {
      resolve(error ? { method, code: grpc.status[error.code], message: error.details } : { method, response });
    });
  });
}

(async () => {
  const results = [
    await call(admin, "Stats", {}),
    await call(retrieval, "Search", { text: "Which board game has knights and bishops?", k: 2 }),
    await call(retrieval, "Search", { text: "anything", k: 2, namespace: "no-such-namespace" }),
  ];
  for (const result of results) console.log(JSON.stringify(result));
  retrieval.close();
  admin.close();
})();
