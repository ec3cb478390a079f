# shellcheck shell=sh
# Sourced by the deploy/ containers and tasks before they start a swarmrt role:
#
#   . /opt/swarmrt/join.sh && exec swarmrt peer --config "$CONFIG" --initial-peers $MADDR \
#       --host "$HOST" --stage 0
#
# It sets three variables:
#   MADDR   the multiaddr(s) to join through, space-separated (leave $MADDR unquoted)
#   HOST    this node's address as the others reach it: pass it as --host (listen there and
#           announce it), or, behind NAT, listen with --host 0.0.0.0 and pass it as
#           --announce-host with a fixed --dht-port
#   CONFIG  the run config ($SWARMRT_CONFIG, checked; nothing in it is rewritten)
#
# Environment it reads:
#   SWARMRT_INITIAL_PEERS  multiaddr(s) to join through, space-separated; when unset they are
#                          read from SWARMRT_ADDR_FILE
#   SWARMRT_ADDR_FILE      the file `swarmrt bootstrap --addr-file` writes (on a shared volume);
#                          waited for up to SWARMRT_WAIT_S seconds (default 300). Loopback
#                          addresses in it are dropped: they only work on the bootstrap's host
#   SWARMRT_CONFIG         the run config (TOML or YAML); required
#   SWARMRT_HOST           this node's address as the others reach it (pod IP, container IP,
#                          VM public IP); default: the address of the default route
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
    CONFIG=$SWARMRT_CONFIG
    HOST=$("$_py" - "$CONFIG" "${SWARMRT_HOST:-}" <<'PY'
import socket, sys

from swarmrt.config import ConfigError, load_config

source, host = sys.argv[1:3]
try:
    load_config(source)
except ConfigError as e:
    sys.exit(f"join.sh: config error: {e}")
if not host:  # the address of the default route; a UDP connect sends nothing
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.254.254.254", 1))
        host = s.getsockname()[0]
    except OSError:
        host = "127.0.0.1"
    finally:
        s.close()
print(host)
print(f"join.sh: this node is reached at {host}", file=sys.stderr)
PY
) || return $?
}

swarmrt_join
