#!/usr/bin/env bash
# Build the per-family trial images that runner=docker uses (`make images` calls this):
#   mlops-tune-sklearn:<tag>   scikit-learn estimators, no TensorFlow
#   mlops-tune-keras:<tag>     Keras models (ann, cnn), TensorFlow CPU
#
#   BASE_IMAGE=python:3.11-slim-bookworm TAG=latest docker/build-images.sh [sklearn] [keras]
#
# BASE_IMAGE: any Debian-like image with python3 + venv (default: the official Python image;
# offline: docker/base-image.sh builds one). EXTRA_CA_DIR: a folder of PEM *.crt files to
# trust inside the build (default: Debian's local CA folder, if it has any).
set -euo pipefail
cd "$(dirname "$0")/.."
base="${BASE_IMAGE:-python:3.11-slim-bookworm}"
tag="${TAG:-latest}"
ca_dir="${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
families=("$@")
[ ${#families[@]} -gt 0 ] || families=(sklearn keras)

# the extra-CA step: copy the certificates into the build context (git-ignored)
find docker/extra-ca -name '*.crt' -delete
if [ -d "$ca_dir" ]; then
  find "$ca_dir" -maxdepth 2 -name '*.crt' -exec cp {} docker/extra-ca/ \;
fi
echo "extra CA certificates: $(find docker/extra-ca -name '*.crt' | wc -l)"

for family in "${families[@]}"; do
  case "$family" in
    sklearn) extras=proxy ;;
    keras) extras=keras,proxy ;;
    *) echo "build-images.sh: unknown family '$family' (sklearn, keras)" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  echo "building mlops-tune-$family:$tag from $base ..."
  # host network: pip reaches the package index the way the host does
  docker build --network host --build-arg "BASE_IMAGE=$base" \
    --build-arg "FAMILY=$family" --build-arg "EXTRAS=$extras" \
    -f docker/trial.Dockerfile -t "mlops-tune-$family:$tag" .
  echo "built mlops-tune-$family:$tag in $(( $(date +%s) - start )) s" \
       "($(docker image inspect -f '{{.Size}}' "mlops-tune-$family:$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
done
