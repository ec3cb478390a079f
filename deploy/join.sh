# shellcheck shell=sh
# Sourced by the deploy/ containers and tasks before they start a swarmrt role:
#
#   . /opt/swarmrt/join.sh && exec swarmrt peer --config "$CONFIG" --initial-peers $MADDR --stage 0
#
# It sets two variables:
#   MADDR   the multiaddr(s) to join through, space-separated (leave $MADDR unquoted)
#   CONFIG  the run config for this node: a copy of $SWARMRT_CONFIG whose network.host is
#           this node's reachable address, since a stage peer listens on and announces
#           network.host (one shared config cannot name every node's address)
#
# Environment it reads:
#   SWARMRT_INITIAL_PEERS  multiaddr(s) to join through, space-separated; when unset they are
#                          read from SWARMRT_ADDR_FILE
#   SWARMRT_ADDR_FILE      the file `swarmrt bootstrap --addr-file` writes (on a shared volume);
#                          waited for up to SWARMRT_WAIT_S seconds (default 300). Loopback
#                          addresses in it are dropped: they only work on the bootstrap's host
#   SWARMRT_CONFIG         the run config (TOML or YAML); required
#   SWARMRT_HOST           this node's address as the others reach it (pod IP, container IP,
#                          VM private IP); default: the address of the default route
#   SWARMRT_NODE_CONFIG    where to write CONFIG (default /tmp/swarmrt-node.yaml)
#   SWARMRT_PYTHON         a python with swarmrt installed (default python3)
#
# Returns non-zero, with one line on stderr, when something is missing.

swarmrt_join() {
    _py=${SWARMRT_PYTHON:-python3}
    if [ -z "${SWARMRT_CONFIG:-}" ]; then
        echo "join.sh: set SWARMRT_CONFIG to the run config file" >&2
        return 2
    fi
    MADDR=${SWARMRT_INITIAL_PEERS:-}
    if [ -z "$MADDR" ]; then
        if [ -z "${SWARMRT_ADDR_FILE:-}" ]; then
            echo "join.sh: set SWARMRT_INITIAL_PEERS, or SWARMRT_ADDR_FILE to the bootstrap's --addr-file" >&2
            return 2
        fi
        _waited=0
        while [ ! -s "$SWARMRT_ADDR_FILE" ]; do
            if [ "$_waited" -ge "${SWARMRT_WAIT_S:-300}" ]; then
                echo "join.sh: no bootstrap address in $SWARMRT_ADDR_FILE after ${_waited} s" >&2
                return 1
            fi
            sleep 1
            _waited=$((_waited + 1))
        done
        MADDR=$(grep -v -e '/ip4/127\.' -e '/ip6/::1/' "$SWARMRT_ADDR_FILE" | tr '\n' ' ')
        if [ -z "$(echo "$MADDR" | tr -d ' ')" ]; then
            MADDR=$(tr '\n' ' ' < "$SWARMRT_ADDR_FILE")
        fi
    fi
    CONFIG=${SWARMRT_NODE_CONFIG:-/tmp/swarmrt-node.yaml}
    "$_py" - "$SWARMRT_CONFIG" "${SWARMRT_HOST:-}" "$CONFIG" <<'PY'
import os, socket, sys

import yaml

from swarmrt.config import ConfigError, load_config, with_overrides

source, host, out = sys.argv[1:4]
if not host:  # the address of the default route; a UDP connect sends nothing
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.254.254.254", 1))
        host = s.getsockname()[0]
    except OSError:
        host = "127.0.0.1"
    finally:
        s.close()
try:
    config = with_overrides(load_config(source), network={"host": host})
except ConfigError as e:
    sys.exit(f"join.sh: config error: {e}")
with open(out + ".tmp", "w") as f:
    yaml.safe_dump(config.to_dict(), f, sort_keys=False)
os.replace(out + ".tmp", out)
print(f"join.sh: network.host = {host}; config {out}", file=sys.stderr)
PY
}

swarmrt_join
