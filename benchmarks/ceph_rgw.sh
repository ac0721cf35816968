#!/usr/bin/env bash
# A single-node Ceph cluster (one mon, one OSD on memstore, one RADOS Gateway) on 127.0.0.1: a real,
# production S3 server for the registry benchmark and for running the S3 tests against something other than
# moto_server. Not used by CI. Needs Debian's Ceph packages (about 40 s to install):
#   apt-get install -y --no-install-recommends ceph-mon ceph-osd radosgw ceph-common
# Modelled on the micro-osd.sh scripts of go-ceph and s3-tests. All state lives under $CEPH_DIR.
#   benchmarks/ceph_rgw.sh          start (stops a previous one first), prints the S3 endpoint and credentials
#   benchmarks/ceph_rgw.sh stop     stop it and remove its state
# Then, for example:
#   export KVAGENT_TEST_S3_URL=http://127.0.0.1:7480 AWS_ACCESS_KEY_ID=BENCHKEY AWS_SECRET_ACCESS_KEY=BENCHSECRET
#   python -m pytest tests/test_blobs.py; python -m benchmarks.registry_load --object-store "Ceph RGW 16.2"
set -euo pipefail
D=${CEPH_DIR:-/tmp/kvagent-ceph}
RGW_PORT=${RGW_PORT:-7480}
MEMSTORE_BYTES=${MEMSTORE_BYTES:-4294967296}   # 4 GiB of RAM for the OSD's objects

stop() {
  for name in client.rgw.bench osd.0 mgr.a mon.a; do
    f=$D/run/$name.pid
    if [ -f "$f" ]; then
      pid=$(cat "$f")
      if kill -0 "$pid" 2>/dev/null; then kill "$pid" || true; fi
    fi
  done
  # wait up to 10 s for exit, then SIGKILL stragglers (by pid only)
  for i in $(seq 1 20); do
    alive=0
    for f in $D/run/*.pid; do [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.5
  done
  for f in $D/run/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
  rm -rf $D/data $D/run $D/log $D/ceph.conf $D/keyring $D/monmap
}

if [ "${1:-start}" = stop ]; then
  stop
  echo "stopped"
  exit 0
fi
stop
mkdir -p $D/data/mon $D/data/osd/0 $D/data/mgr/a $D/data/rgw $D/run $D/log
FSID=$(cat /proc/sys/kernel/random/uuid)
export CEPH_CONF=$D/ceph.conf
cat > $CEPH_CONF <<CONF
[global]
fsid = $FSID
mon host = 127.0.0.1:6789
mon initial members = a
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $D/keyring
run dir = $D/run
pid file = $D/run/\$name.pid
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
log to stderr = false
err to stderr = true
mon cluster log file = $D/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
ms bind ipv6 = false
# cosmetic HEALTH_WARN suppressions (disk is <30% free; v1 messenger only on loopback)
mon data avail warn = 1
mon data avail crit = 0
mon warn on insecure global id reclaim allowed = false
mon warn on msgr2 not enabled = false
[mon]
mon data = $D/data/mon/\$cluster-\$id
[mgr]
mgr data = $D/data/mgr/\$id
[osd]
osd data = $D/data/osd/\$id
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
osd max object size = 1073741824
[client.rgw.bench]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw data = $D/data/rgw
rgw dns name = 127.0.0.1
rgw thread pool size = 128
# quieter per-request logging (set debug rgw = 1 to get beast access-log lines)
debug rgw = 0/0
debug ms = 0/0
# memstore keeps deleted tail objects in RAM until RGW GC runs; make GC prompt
rgw gc obj min wait = 30
rgw gc processor period = 30
CONF

# keyrings
ceph-authtool --create-keyring --gen-key --name=mon. $D/keyring --cap mon 'allow *' >/dev/null
ceph-authtool --gen-key --name=client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' $D/keyring >/dev/null
ceph-authtool --gen-key --name=client.rgw.bench --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw' $D/keyring >/dev/null
ceph-authtool --gen-key --name=osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd' $D/keyring >/dev/null
ceph-authtool --gen-key --name=mgr.a --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *' $D/keyring >/dev/null

# mon
monmaptool --create --clobber --fsid $FSID --add a 127.0.0.1:6789 $D/monmap >/dev/null
ceph-mon --id a --mkfs --monmap $D/monmap --keyring $D/keyring
ceph-mon --id a
for i in $(seq 1 60); do timeout 5 ceph -s >/dev/null 2>&1 && break; sleep 0.5; done
echo "mon up"

# osd (memstore)
ceph osd create >/dev/null
ceph-osd --id 0 --mkfs --keyring $D/keyring >/dev/null 2>&1
cp $D/keyring $D/data/osd/0/keyring
ceph-osd --id 0 2>/dev/null
for i in $(seq 1 120); do
  ceph osd stat 2>/dev/null | grep -q '1 up' && break; sleep 0.5
done
ceph osd stat
echo "osd up"

# rgw
radosgw --id rgw.bench
for i in $(seq 1 240); do
  curl -s -o /dev/null http://127.0.0.1:$RGW_PORT/ && break; sleep 0.5
done
curl -s -o /dev/null -w 'rgw http %{http_code}\n' http://127.0.0.1:$RGW_PORT/
radosgw-admin user create --uid=bench --display-name=bench --access-key=BENCHKEY --secret-key=BENCHSECRET >/dev/null
echo "S3 endpoint: http://127.0.0.1:$RGW_PORT  access_key=BENCHKEY secret_key=BENCHSECRET region=us-east-1 (path-style)"
