#!/usr/bin/env bash
# Build the images, tagged by release AND commit, so a cluster always runs a known build:
#   openrlhf-passk-{train,reward,cpu}:<version>            e.g. 0.1.0 (moves with each build of the release)
#   openrlhf-passk-{train,reward,cpu}:<version>-<commit>   e.g. 0.1.0-3f2a9c1 (immutable; use this in k8s/)
# By default the two that clusters run (train, reward); the CPU trainer image (local runs without a GPU,
# docker/cpu.Dockerfile) only when named.
#
#   scripts/build_images.sh                                   # train + reward, local tags
#   scripts/build_images.sh cpu                               # the CPU trainer image
#   scripts/build_images.sh train reward cpu                  # all three
#   REGISTRY=registry.example.com/ml PUSH=1 scripts/build_images.sh
#   FLASH_ATTN_WHEEL=https://.../flash_attn-2.8.3+...whl scripts/build_images.sh train
#   DRY_RUN=1 scripts/build_images.sh                         # print the commands only
#
# Then: python scripts/render_k8s.py --image-prefix $REGISTRY --tag <version>-<commit>
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/common.sh
source "$here/lib/common.sh"
repo=$(cd "$here/.." && pwd)

VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml")}
# A Docker tag allows letters, digits, '_', '.' and '-' (no '+': PEP 440 local versions need another spelling).
[[ -n $VERSION ]] || die "VERSION: cannot read the version from pyproject.toml (set VERSION=x.y.z)"
[[ $VERSION =~ ^[0-9A-Za-z_][0-9A-Za-z_.-]*$ ]] ||
    die "VERSION '$VERSION' is not a valid Docker tag (letters, digits, '_', '.', '-'; no '+'): set VERSION=x.y.z"
if [[ -z ${VCS_REF:-} ]]; then
    VCS_REF=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ -n $(git -C "$repo" status --porcelain 2>/dev/null) ]]; then
        VCS_REF+="-dirty" # uncommitted changes: the commit alone would lie about the contents
    fi
fi
[[ $VCS_REF =~ ^[0-9A-Za-z-]+$ ]] || die "VCS_REF must be a commit id, got '$VCS_REF'"
REGISTRY=${REGISTRY:-}
prefix=${REGISTRY:+$REGISTRY/}
images=("$@")
((${#images[@]})) || images=(train reward)

for image in "${images[@]}"; do
    [[ $image == train || $image == reward || $image == cpu ]] ||
        die "usage: build_images.sh [train] [reward] [cpu] (got '$image')"
    name=${prefix}openrlhf-passk-$image
    cmd=(docker build -f "$repo/docker/$image.Dockerfile" --build-arg "VERSION=$VERSION" --build-arg "VCS_REF=$VCS_REF"
        -t "$name:$VERSION" -t "$name:$VERSION-$VCS_REF")
    if [[ $image == train && -n ${FLASH_ATTN_WHEEL:-} ]]; then
        cmd+=(--build-arg "FLASH_ATTN_WHEEL=$FLASH_ATTN_WHEEL")
    fi
    run_or_print "${cmd[@]}" "$repo"
    if [[ ${PUSH:-0} == 1 ]]; then
        [[ -n $REGISTRY ]] || die "PUSH=1 needs REGISTRY=<registry/namespace>"
        run_or_print docker push "$name:$VERSION-$VCS_REF"
        run_or_print docker push "$name:$VERSION"
    fi
done
# The Kubernetes manifests use the train and reward images only.
if [[ " ${images[*]} " == *" train "* || " ${images[*]} " == *" reward "* ]]; then
    echo "render the manifests with: python scripts/render_k8s.py${REGISTRY:+ --image-prefix $REGISTRY} --tag $VERSION-$VCS_REF"
fi
