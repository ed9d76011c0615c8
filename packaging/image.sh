#!/bin/sh
# Builds the esxi-reconciler container image from the Debian package, without pulling any base image:
# mmdebstrap makes a minimal Debian 12 root from Debian's packages and installs the .deb into it,
# buildah turns that root into a one-layer image. With the same SOURCE_DATE_EPOCH (make image: the
# date of the changelog the .deb was built from; default here: the .deb file's time) two builds of one
# .deb give the same root file system and OCI image; the docker-format config differs only in the
# "container" field, the random id of buildah's build container (docs/packaging.md "Reproducible").
#
#   packaging/image.sh DEB OUTDIR [TAG]     (make image runs it; docs/packaging.md says what is in it)
#
# OUTDIR gets rootfs.tar (the root file system), esxi-reconciler.docker.tar (docker-archive: `docker
# load`, Synology Container Manager and QNAP Container Station import it), oci/ (an OCI image layout)
# and digests.txt. IMAGE_EXTRA_PACKAGES adds Debian packages (e.g. "git openssh-client gnupg" for a
# config followed from git with `run --source`).
set -eu

deb=$(realpath "$1")
out=$2
tag=${3:-esxi-reconciler:$(dpkg-deb -f "$deb" Version)}
suite=${SUITE:-bookworm}
: "${SOURCE_DATE_EPOCH:=$(date -r "$deb" +%s)}"
export SOURCE_DATE_EPOCH

mkdir -p "$out"
out=$(realpath "$out")

# The package's dependencies by name (versions are the suite's), installed with the root; the .deb
# itself is installed by dpkg in the customize hook, as `apt install ./x.deb` would.
depends=$(dpkg-deb -f "$deb" Depends | sed -e 's/([^)]*)//g' -e 's/:any//g' -e 's/[[:space:]]//g')

# The essential variant: dpkg, coreutils, a shell and the libraries, no apt; /usr merged by the hook
# rather than by the usrmerge package (which would bring Perl). No documentation, man pages,
# translations, completion or iconv converters (the copyright files stay). Byte code is compiled once,
# with a fixed hash seed (PYTHONHASHSEED) so that it is the same in every build, and the package
# lists are dropped.
rm -f "$out/rootfs.tar"
mmdebstrap --variant=essential --mode=root \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include="$depends${IMAGE_EXTRA_PACKAGES:+,$(echo "$IMAGE_EXTRA_PACKAGES" | tr ' ' ',')}" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/zsh/*' \
    --dpkgopt='path-exclude=/usr/share/bash-completion/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/gconv/*' \
    --customize-hook='mkdir -p "$1/tmp/deb"' \
    --customize-hook="copy-in $deb /tmp/deb" \
    --customize-hook='chroot "$1" env PYTHONHASHSEED=0 dpkg -i /tmp/deb/'"$(basename "$deb")" \
    --customize-hook='rm -rf "$1/tmp/deb"' \
    --customize-hook='find "$1/usr" "$1/etc" -name "*.pyc" -delete' \
    --customize-hook='chroot "$1" env PYTHONHASHSEED=0 python3 -m compileall -q -j1 \
        --invalidation-mode=unchecked-hash /usr/lib/python3.11 /usr/lib/python3/dist-packages \
        /usr/lib/esxi-reconciler >/dev/null' \
    --customize-hook='chroot "$1" install -d -m 700 -o esxi-reconciler -g esxi-reconciler /srv/backups/esxi' \
    --customize-hook='rm -rf "$1/var/cache/debconf"/*-old "$1/var/lib/dpkg"/*-old "$1/var/log"/*' \
    "$suite" "$out/rootfs.tar"

uid=$(tar -xOf "$out/rootfs.tar" ./etc/passwd | awk -F: '$1 == "esxi-reconciler" { print $3 ":" $4 }')

# docker format throughout: its image config carries the HEALTHCHECK (the OCI format has no field for it).
export BUILDAH_FORMAT=docker
ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah add --quiet "$ctr" "$out/rootfs.tar" /
version=$(dpkg-deb -f "$deb" Version)
buildah config \
    --user "$uid" \
    --workingdir /var/lib/esxi-reconciler \
    --env ESXI_RECONCILER_CONFIG=/etc/esxi-reconciler/config.d \
    --env CREDENTIALS_DIRECTORY=/run/secrets \
    --env PYTHONDONTWRITEBYTECODE=1 \
    --entrypoint '["/usr/bin/esxi-reconciler"]' \
    --cmd 'run' \
    --volume /etc/esxi-reconciler/config.d \
    --volume /var/lib/esxi-reconciler \
    --volume /srv/backups/esxi \
    --healthcheck 'CMD /usr/bin/esxi-reconciler status' \
    --healthcheck-interval 5m \
    --healthcheck-timeout 30s \
    --healthcheck-start-period 10m \
    --healthcheck-retries 3 \
    --stop-signal SIGTERM \
    --hostname esxi-reconciler \
    --label org.opencontainers.image.title=esxi-reconciler \
    --label org.opencontainers.image.description="GitOps-style backup for VMware ESXi virtual machines" \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    --created-by "packaging/image.sh (mmdebstrap $suite + esxi-reconciler $version)" \
    "$ctr"
buildah commit --quiet --format docker --identity-label=false --timestamp "$SOURCE_DATE_EPOCH" --rm "$ctr" "$tag" >/dev/null
trap - EXIT

rm -rf "$out/oci" "$out/esxi-reconciler.docker.tar"
buildah push --quiet "$tag" "docker-archive:$out/esxi-reconciler.docker.tar:$tag"
buildah push --quiet --format oci "$tag" "oci:$out/oci:$version"
{
    echo "image $tag"
    echo "docker-manifest $(buildah inspect --type image --format '{{.FromImageDigest}}' "$tag")"
    echo "oci-manifest $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$out/oci/index.json")"
    echo "rootfs-sha256 $(sha256sum < "$out/rootfs.tar" | cut -d" " -f1)"
    echo "size-uncompressed $(stat -c %s "$out/rootfs.tar")"
    echo "size-docker-archive $(stat -c %s "$out/esxi-reconciler.docker.tar")"
} > "$out/digests.txt"
# The archives are the product; the build machine's image store keeps nothing of it.
buildah rmi "$tag" >/dev/null
cat "$out/digests.txt"
