#!/bin/sh
# Start SeaweedFS in one container (master, volume, filer and the S3 gateway) with a single S3
# identity taken from the environment, so the credentials live in one place: the compose file's
# shared AWS_* variables. The config goes to /tmp because it holds the secret.
set -eu
umask 077
printf '{"identities":[{"name":"backdrop","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","List","Tagging","Write"]}]}\n' \
    "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" > /tmp/s3.json
exec weed server \
    -dir=/data \
    -ip.bind=0.0.0.0 \
    -master.volumeSizeLimitMB=1024 \
    -s3 \
    -s3.port=8333 \
    -s3.config=/tmp/s3.json
