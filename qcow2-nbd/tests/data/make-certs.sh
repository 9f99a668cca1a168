#!/usr/bin/env bash
# Makes x509 credentials for the TLS tests in QEMU's tls-creds-x509 layout, with openssl:
#   DIR/server: ca-cert.pem server-cert.pem server-key.pem  (server for 127.0.0.1/localhost)
#   DIR/client: ca-cert.pem client-cert.pem client-key.pem  (subject C=GB,O=Test,CN=client)
#   DIR/other:  ca-cert.pem client-cert.pem client-key.pem  (client certificate from
#               another CA, which the server never trusts)
# EC P-256 keys, valid for two days. Usage: make-certs.sh DIR
set -euo pipefail
dir=$1
mkdir -p "$dir/server" "$dir/client" "$dir/other" "$dir/work"
w=$dir/work
ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
ca() { # ca NAME: a CA certificate and key in $w
    openssl req -x509 "${ec[@]}" -keyout "$w/$1-key.pem" -out "$w/$1-cert.pem" -days 2 \
        -subj "/CN=$1" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}
leaf() { # leaf CA SUBJECT EXTFILE KEY CERT
    openssl req "${ec[@]}" -keyout "$4" -out "$w/leaf.csr" -subj "$2" 2>/dev/null
    openssl x509 -req -in "$w/leaf.csr" -CA "$w/$1-cert.pem" -CAkey "$w/$1-key.pem" \
        -CAcreateserial -out "$5" -days 2 -extfile "$3" 2>/dev/null
}
ca test-ca
ca other-ca
printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost" >"$w/server.ext"
printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=clientAuth" \
    >"$w/client.ext"
leaf test-ca "/O=Test/CN=127.0.0.1" "$w/server.ext" "$dir/server/server-key.pem" \
    "$dir/server/server-cert.pem"
leaf test-ca "/C=GB/O=Test/CN=client" "$w/client.ext" "$dir/client/client-key.pem" \
    "$dir/client/client-cert.pem"
leaf other-ca "/C=GB/O=Test/CN=client" "$w/client.ext" "$dir/other/client-key.pem" \
    "$dir/other/client-cert.pem"
cp "$w/test-ca-cert.pem" "$dir/server/ca-cert.pem"
cp "$w/test-ca-cert.pem" "$dir/client/ca-cert.pem"
# The other client trusts the server: only the server can refuse it.
cp "$w/test-ca-cert.pem" "$dir/other/ca-cert.pem"
rm -rf "$w"
