#!/bin/sh
# Run a command against a throw-away single-node Ceph RGW: one monitor, one OSD on memstore (no disk),
# one radosgw, from Debian's packages (ceph-mon, ceph-osd, radosgw); no systemd, no cephx (loopback only).
#
#   tests/ceph/rgw.sh DIR PORT COMMAND...
#
# COMMAND runs with S3_TEST_ENDPOINT, S3_TEST_ACCESS_KEY and S3_TEST_SECRET_KEY set (tests/s3server.py
# then points every S3 test at the RGW); the daemons are stopped and DIR removed afterwards, and the
# script exits with COMMAND's status. Needs root (the monitor and the OSD use ports 3300 and 6800+).
set -eu
D=$1; PORT=$2; shift 2
rm -rf "$D"
mkdir -p "$D/mon" "$D/osd" "$D/run" "$D/log"
stop() {
    pids=$(cat "$D"/run/*.pid 2>/dev/null || true)
    # radosgw first (it waits for the monitor on its way out), then the OSD and the monitor
    for name in client.rgw osd.0 mon.a; do
        [ -f "$D/run/$name.pid" ] && kill "$(cat "$D/run/$name.pid")" 2>/dev/null || true
    done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        alive=""
        for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
        [ -z "$alive" ] && break
        sleep 1
    done
    for pid in $pids; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$D"
}
trap stop EXIT INT TERM
FSID=$(cat /proc/sys/kernel/random/uuid)
cat > "$D/ceph.conf" <<CONF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:3300
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc secure
ms client mode = crc secure
ms mon service mode = crc secure
ms service mode = crc secure
run dir = $D/run
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
pid file = $D/run/\$name.pid
mon data = $D/mon/\$cluster-\$id
osd data = $D/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = 2147483648
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
[client.rgw]
rgw frontends = beast port=$PORT
CONF
C="-c $D/ceph.conf"
monmaptool --create --addv a "[v2:127.0.0.1:3300]" --fsid "$FSID" "$D/monmap" >/dev/null
ceph-mon $C --mkfs -i a --monmap "$D/monmap"
ceph-mon $C -i a
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
ID=$(ceph $C osd new "$OSD_UUID")
mkdir -p "$D/osd/ceph-$ID"
ceph-osd $C -i "$ID" --mkfs --osd-uuid "$OSD_UUID" 2>/dev/null
ceph-osd $C -i "$ID" 2>/dev/null
radosgw $C -n client.rgw
i=0
until curl -sf -o /dev/null "http://127.0.0.1:$PORT/"; do
    i=$((i + 1))
    if [ "$i" -gt 120 ]; then echo "radosgw did not answer on port $PORT (logs: $D/log)" >&2; exit 1; fi
    sleep 1
done
radosgw-admin $C user create --uid=esxi-test --display-name=esxi-test \
    --access-key=esxi-test-key --secret-key=esxi-test-secret >/dev/null
echo "Ceph RGW $(radosgw --version | cut -d' ' -f3) on http://127.0.0.1:$PORT" >&2
status=0
S3_TEST_ENDPOINT="http://127.0.0.1:$PORT" S3_TEST_ACCESS_KEY=esxi-test-key S3_TEST_SECRET_KEY=esxi-test-secret \
    "$@" || status=$?
exit $status
