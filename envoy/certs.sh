#!/usr/bin/env bash
# Make a dev/test certificate authority and certificates for the gateway:
#
#   envoy/certs.sh DIR
#
# DIR/ca.pem, ca.key             the CA (trust anchor for clients, Envoy and rag-grpc)
# DIR/server.pem, server.key     Envoy's serving certificate: localhost, 127.0.0.1,
#                                spiffe://rag-grpc.test/gateway (the By= of its XFCC)
# DIR/client.pem, client.key     client identity spiffe://rag-grpc.test/client/alice
# DIR/client2.pem, client2.key   second identity spiffe://rag-grpc.test/client/bob
# DIR/gateway.pem, gateway.key   Envoy's client certificate towards rag-grpc:
#                                spiffe://rag-grpc.test/gateway
# DIR/rag-grpc.pem, rag-grpc.key rag-grpc's serving certificate: localhost, 127.0.0.1
#
# ECDSA P-256 keys, valid 30 days. For tests and development only: a
# deployment's certificates come from its own CA, and rag-grpc's client CA
# (--tls-client-ca) should sign only the gateway and the clients allowed to
# call rag-grpc directly.
set -euo pipefail
dir=${1:?usage: envoy/certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
days=30
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1" 2>/dev/null; chmod 600 "$1"; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/O=rag-grpc test/CN=rag-grpc test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem

issue() {  # name, subject CN, subjectAltName, extendedKeyUsage
    key "$1.key"
    openssl req -new -key "$1.key" -subj "/O=rag-grpc test/CN=$2" -out "$tmp/$1.csr"
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
        "$4" "$3" > "$tmp/$1.ext"
    openssl x509 -req -in "$tmp/$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
        -days "$days" -extfile "$tmp/$1.ext" -out "$1.pem" 2>/dev/null
}

gateway="URI:spiffe://rag-grpc.test/gateway"
issue server "localhost" "DNS:localhost,IP:127.0.0.1,$gateway" serverAuth
issue client "alice" "URI:spiffe://rag-grpc.test/client/alice" clientAuth
issue client2 "bob" "URI:spiffe://rag-grpc.test/client/bob" clientAuth
issue gateway "gateway" "$gateway" clientAuth
issue rag-grpc "localhost" "DNS:localhost,IP:127.0.0.1" serverAuth
rm -f ca.srl
echo "certificates in $dir: ca.pem server.pem client.pem client2.pem gateway.pem rag-grpc.pem (and their keys)"
