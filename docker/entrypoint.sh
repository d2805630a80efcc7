#!/bin/sh
# Entry point of the alrp-d2 image: makes the output folder writable, then runs the
# command (train_net.py) as an unprivileged user.
#
# Docker creates a missing host folder of a bind mount as root, where the training user
# could not write. Started as root, this script runs the command as the owner of the
# output folder, so that the files it writes belong to the host folder's owner; a folder
# owned by root (just created by Docker) is first given to the image's user (uid 1000).
# Started as another user (`user:` in compose), it runs the command as that user.
set -eu
OUTPUT="${ALRP_OUTPUT:-/output}"
if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi
mkdir -p "$OUTPUT"
uid=$(stat -c %u "$OUTPUT")
gid=$(stat -c %g "$OUTPUT")
if [ "$uid" = 0 ]; then
    uid=1000
    gid=1000
    chown "$uid:$gid" "$OUTPUT"
fi
if [ "$uid" != 1000 ]; then
    # No home of its own for another uid: caches (fvcore, matplotlib) go to a writable one.
    export HOME="/tmp/home-$uid"
    mkdir -p "$HOME"
    chown "$uid:$gid" "$HOME"
fi
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups "$@"
