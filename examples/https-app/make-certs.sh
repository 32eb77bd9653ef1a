#!/bin/sh
# A self-signed certificate for the example, named after its harbor service.
set -e
cd "$(dirname "$0")"
mkdir -p certs
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=custom-cert-https.example" \
  -keyout certs/custom-cert-https.key -out certs/custom-cert-https.crt 2>/dev/null
echo "wrote certs/custom-cert-https.crt and .key"
