"""The ``swarmrt`` command: one console script, a subcommand per role.

Bad flags and bad config values print one line naming what was wrong and exit 2. A trainer
(``train``, ``eval``) that gives up on a stage without peers prints one line naming the stage and
exits 3 (:data:`EXIT_NO_PEERS`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import pathlib
import sys
import time

from swarmrt.auth.credential import ENV_VAR as TOKEN_VAR
from swarmrt.config import ConfigError, load_config
from swarmrt.checkpoint.store import CheckpointError
from swarmrt.discovery.reachability import NetworkError
from swarmrt.cli.export import add_export_parser
from swarmrt.sim.cli import add_plan_parser, add_simulate_parser

EXIT_USAGE = 2
EXIT_NO_PEERS = 3
EXIT_NETWORK = 4
"""The DHT could not be joined (bootstrap unreachable, address not assignable), or nobody could dial a
peer's announced address and ``network.reachability = "fail"``: one line on stderr with the fix."""
"""``swarmrt train``/``eval``: a stage had no peer and the swarm did not fill it in time."""
NO_PEERS_EPILOG = (f"exit status {EXIT_NO_PEERS}: a stage had no peer and none could be moved there for "
                   "network.no_peers_timeout_s (or stayed empty 3x that long although peers could move there); "
                   "one line on stderr names the stage. While the swarm can fill a stage the trainer waits and "
                   "says so on stderr.")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, not a usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING if verbose else logging.ERROR)


def _token(args):
    """The join token a member role was given (``--join-token`` or the environment); a usage error without one."""
    from swarmrt.auth.token import require_token

    return require_token(args.join_token, time.time())


def _common(p: argparse.ArgumentParser, config: bool = True, peers: bool = True) -> None:
    if config:
        p.add_argument("--config", required=True, help="run config file (TOML or YAML)")
    if peers:
        p.add_argument("--initial-peers", required=True, nargs="+", metavar="MADDR",
                       help="multiaddr(s) of a DHT peer to join through (printed by `swarmrt bootstrap`)")
        p.add_argument("--join-token", metavar="FILE", help="the run's join token, written by `swarmrt bootstrap` "
                       f"(default: ${TOKEN_VAR})")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress of every component")


# -- bootstrap ---------------------------------------------------------------------------------
def cmd_bootstrap(args) -> int:
    from swarmrt.roles.bootstrap import serve_bootstrap
    from swarmrt.roles.proc import run

    check_bootstrap_flags(args)
    from swarmrt.auth.token import token_path

    return run(serve_bootstrap(args.initial_peers, args.host, args.port, args.addr_file,
                               join_token=token_path(args.join_token) or "join-token", run_key=args.run_key,
                               token_valid_s=args.token_days * 86400, announce_host=args.announce_host,
                               identity=args.identity, use_auto_relay=args.use_auto_relay))


FLAGS = {"network.host": "--host", "network.announce_host": "--announce-host", "network.dht_port": "--dht-port",
         "network.use_auto_relay": "--use-auto-relay", "network.reachability": "--reachability"}


def _flag_error(e: ConfigError) -> ConfigError:
    """``e`` with the network keys it names written as the flags that set them."""
    text = str(e)
    for key, flag in FLAGS.items():
        text = text.replace(key, f"{flag} ({key})")
    return ConfigError(text)


def check_bootstrap_flags(args) -> None:
    """The bootstrap's address flags, checked as the network section checks a peer's (one line naming the flag)."""
    from swarmrt.config import WILDCARDS, NetworkSection

    host = args.host
    if host in WILDCARDS and args.announce_host is None:
        host = "127.0.0.1"  # a bootstrap on every interface prints each interface's address: nothing to check
    try:
        NetworkSection(host=host, announce_host=args.announce_host, dht_port=args.port)
    except ConfigError as e:
        raise _flag_error(e) from None
    if args.identity is not None and pathlib.Path(args.identity).is_dir():
        raise ConfigError(f"--identity {args.identity}: is a directory; give the key file (created when missing)")


def with_network_flags(config, args):
    """``config`` with the network flags given on the command line (``--host``, ``--announce-host``,
    ``--dht-port``, ``--use-auto-relay``) in place of its ``[network]`` keys; checked the same way."""
    import dataclasses

    changes = {name: getattr(args, name) for name in ("host", "announce_host", "dht_port")
               if getattr(args, name, None) is not None}
    if getattr(args, "use_auto_relay", False):
        changes["use_auto_relay"] = True
    if getattr(args, "reachability", None) is not None:
        changes["reachability"] = args.reachability
    if not changes:
        return config
    try:
        return dataclasses.replace(config, network=dataclasses.replace(config.network, **changes))
    except ConfigError as e:
        raise _flag_error(e) from None


def add_address_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on, gRPC and DHT (default: network.host, 127.0.0.1; "
                   "0.0.0.0 for other machines, with --announce-host)")
    p.add_argument("--announce-host", metavar="HOST", help="address other machines reach this peer at, announced "
                   "in the DHT (default: network.announce_host, else --host); a VM behind NAT: its public IP")
    p.add_argument("--dht-port", type=int, metavar="PORT", help="fixed TCP port of the DHT node (default: "
                   "network.dht_port, 0: any free port); needed with --announce-host")
    p.add_argument("--use-auto-relay", action="store_true", help="behind NAT: reach others and be reached "
                   "through libp2p relays (network.use_auto_relay)")
    p.add_argument("--reachability", choices=("p2p", "fail", "off"), help="when no peer can dial this one's "
                   "announced address at join: serve over libp2p (p2p), exit with the fix (fail), or do not check "
                   "(off) (default: network.reachability, p2p)")


# -- peer --------------------------------------------------------------------------------------
def cmd_peer(args) -> int:
    from swarmrt.roles.peer import PeerOptions, serve_peer
    from swarmrt.roles.proc import run
    from swarmrt.wire.emulation import load_rules, rules_path

    config = with_network_flags(load_config(args.config), args)
    _check_skip(config)
    net_rules = rules_path(args.net_rules)
    if net_rules:
        load_rules(net_rules)  # a bad rules file is a usage error naming the key
    options = PeerOptions(initial_peers=tuple(args.initial_peers), stage=args.stage, port=args.port,
                          grace_s=args.grace, ready_file=args.ready_file, ledger=args.ledger,
                          compute_delay_s=args.compute_delay, slowdown=args.slowdown, resume=args.resume,
                          net_rules=net_rules, device=args.device)
    options.check(config)  # a bad flag is named before a missing join token
    return run(serve_peer(config, dataclasses.replace(options, join_token=_token(args))))


# -- train -------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from swarmrt import auth
    from swarmrt.discovery.dht import start_dht, stop_dht
    from swarmrt.wire.emulation import client_interceptors, rules_path
    from swarmrt.wire.p2p import routed_client
    from swarmrt.roles.proc import install_stop_handlers
    from swarmrt.checkpoint.store import load_data_position
    from swarmrt.roles.trainer import Trainer

    config = load_config(args.config)
    _check_skip(config)
    if args.trainer_id is not None and (not args.trainer_id or ":" in args.trainer_id):
        raise ConfigError(f"--trainer-id {args.trainer_id!r}: must be non-empty and contain no ':'")
    token = _token(args)
    interceptors = client_interceptors(rules_path(args.net_rules))

    async def main() -> int:
        stop = asyncio.Event()
        install_stop_handlers(asyncio.get_running_loop(), stop,
                              on_first=lambda _: print("trainer: stopping after the step in flight", file=sys.stderr))
        start_step = 0
        if args.resume:
            if config.checkpoint.location is None:
                raise ConfigError("--resume needs [checkpoint] location in the run config")
            start_step = load_data_position(config.checkpoint.location, config.run.id, args.stream) or 0
            print(f"trainer: resuming stream {args.stream} at step {start_step}", file=sys.stderr)
        dht = await asyncio.to_thread(lambda: start_dht(args.initial_peers, client_mode=True,
                                                        **auth.dht_kwargs(token, config.run.id,
                                                                         config.network.record_ttl_s)))
        try:
            # interceptors name this trainer to the peers' emulated links and partitions (if any)
            # gRPC to host:port addresses, libp2p to the peers nobody can dial (they announce p2p: addresses)
            client = routed_client(dht, config.network.max_tensor_mb, interceptors=interceptors,
                                   credentials=auth.call_credentials(token))
            trainer = Trainer(config, dht, client=client, stream=args.stream, metrics_path=args.metrics_file,
                              progress=args.progress if args.progress is not None else sys.stderr.isatty(),
                              trainer_id=args.trainer_id, say=_say)
            _print_result(await trainer.run(args.steps, start_step=start_step, stop=stop), args.summary_file)
            return 0
        finally:
            await asyncio.to_thread(stop_dht, dht)

    return _run_trainer(args, main())


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_trainer(args, main) -> int:
    """Run a trainer's ``main``; a stage without peers for too long is one line and :data:`EXIT_NO_PEERS`."""
    from swarmrt.roles.proc import run
    from swarmrt.roles.trainer import NoPeers

    try:
        return run(main)
    except NoPeers as e:
        print(f"swarmrt {args.command}: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_NO_PEERS


def _print_result(result: dict, summary_file: str | None) -> None:
    """A role's closing JSON: printed, and written to ``--summary-file`` when given."""
    text = json.dumps(result, indent=1)
    if summary_file:
        pathlib.Path(summary_file).write_text(text)
    print(text, flush=True)


# -- eval (and the skip check of peer/train) ----------------------------------------------------
def _check_skip(config) -> None:
    """``routing.skip_ratio > 0`` on a model whose middle stages cannot be skipped: a config error, before
    anything starts."""
    if config.routing.skip_ratio > 0:
        from swarmrt.models.build import check_skip

        check_skip(config)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_eval(args) -> int:
    from swarmrt import auth
    from swarmrt.models.build import skip_compatibility
    from swarmrt.discovery.dht import start_dht, stop_dht
    from swarmrt.roles.trainer import Trainer, parse_stage_subset
    from swarmrt.wire.p2p import routed_client

    config = load_config(args.config)
    stages, why = parse_stage_subset(args.eval_stages, config.num_stages)
    if stages is None:
        raise ConfigError(f"--stages: {why}")
    if len(stages) < config.num_stages:
        ok, reason = skip_compatibility(config)
        if not ok:
            raise ConfigError(f"--stages {args.eval_stages} {why}, but {reason}")
    token = _token(args)

    async def main() -> int:
        dht = await asyncio.to_thread(lambda: start_dht(args.initial_peers, client_mode=True,
                                                        **auth.dht_kwargs(token, config.run.id,
                                                                         config.network.record_ttl_s)))
        try:
            trainer = Trainer(config, dht, client=routed_client(dht, config.network.max_tensor_mb,
                                                                credentials=auth.call_credentials(token)),
                              trainer_id=f"eval-{int(time.time())}", say=_say)
            _print_result(await trainer.evaluate(stages, args.batches), args.summary_file)
            return 0
        finally:
            await asyncio.to_thread(stop_dht, dht)

    return _run_trainer(args, main())


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss and perplexity through all stages or a subset (forward only)",
                       epilog=NO_PEERS_EPILOG)
    _common(p)
    p.add_argument("--stages", dest="eval_stages", metavar="S,S,...",
                   help="stages to go through, e.g. 0,2,5: first and last included, increasing (default: all)")
    p.add_argument("--batches", type=_positive_int, default=4, help="held-out batches of data.batch_size samples")
    p.add_argument("--summary-file", help="also write the result JSON here")
    p.set_defaults(func=cmd_eval)


# -- status ------------------------------------------------------------------------------------
def cmd_status(args) -> int:
    from swarmrt.roles.status import format_status, swarm_status

    report = swarm_status(args.initial_peers, _token(args))
    print(json.dumps(report, indent=1) if args.json else "\n".join(format_status(report)))
    return 0


# -- demo --------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from swarmrt.localswarm.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="swarmrt", description="Train standard PyTorch models on a swarm of unreliable peers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("bootstrap", help="start a DHT peer others join through; prints its multiaddr")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other machines)")
    p.add_argument("--port", "--dht-port", type=int, default=0, help="TCP port (0: any free port; fix it to "
                   "open one port in a firewall, and with --announce-host)")
    p.add_argument("--announce-host", metavar="HOST", help="address to print and announce instead of --host "
                   "(a VM behind NAT: its public IP; needs --port)")
    p.add_argument("--identity", metavar="FILE", help="private key file (created when missing): the same peer id, "
                   "so the same multiaddr, at every start")
    p.add_argument("--use-auto-relay", action="store_true", help="behind NAT: be reached through libp2p relays")
    p.add_argument("--addr-file", help="also write the multiaddr(s) to this file")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="join an existing DHT too")
    p.add_argument("--join-token", metavar="FILE", help="write the run's join token here, for peers, trainers and "
                   f"status (default: ${TOKEN_VAR}, else ./join-token); it is a secret: whoever holds it is a member")
    p.add_argument("--run-key", metavar="FILE", help="the run's key: taken from FILE, or created there if missing "
                   "(default: a new key each start, so earlier join tokens stop working)")
    p.add_argument("--token-days", type=float, default=30.0, help="how long the join token lets its holder in")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("peer", help="serve one pipeline stage")
    _common(p)
    add_address_flags(p)
    p.add_argument("--stage", type=int, help="stage to serve (default: the stage with the least capacity)")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    p.add_argument("--grace", type=float, default=20.0, help="seconds to drain in-flight work on SIGTERM")
    p.add_argument("--ready-file", help="write 'STAGE ADDRESS PEER_ID' here once serving")
    p.add_argument("--ledger", help="append STAGE MICROBATCH_ID for every applied microbatch to this file, and STAGE - "
                        "whenever the stage's state leaves the peer (for checking exactly-once)")
    p.add_argument("--compute-delay", type=float, default=0.0, help="emulated extra seconds per forward/backward")
    p.add_argument("--slowdown", type=float, default=1.0, help="multiply compute time by this factor")
    p.add_argument("--resume", action="store_true",
                   help="load the stage's newest checkpoint ([checkpoint] location) even if other peers serve it")
    p.add_argument("--net-rules", metavar="FILE", help="emulated links and RPC faults (JSON, re-read when it "
                   "changes; default: $SWARMRT_NET_RULES; see swarmrt.wire.emulation)")
    p.add_argument("--device", help="torch device to compute on, e.g. cuda:1 or cpu (default: cuda when present)")
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("train", help="feed data and drive microbatches through the swarm", epilog=NO_PEERS_EPILOG)
    _common(p)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (batches) to train")
    p.add_argument("--metrics-file", help="append one JSON object per step here")
    p.add_argument("--summary-file", help="write the final summary JSON here")
    p.add_argument("--stream", type=int, default=0, help="data stream of this trainer (several trainers: 0, 1, ...)")
    p.add_argument("--resume", action="store_true",
                   help="start at the data position saved under [checkpoint] location (default: step 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.add_argument("--trainer-id", help="prefix of this trainer's microbatch ids (default: random); no ':'")
    p.add_argument("--net-rules", metavar="FILE", help="rules file whose 'node' names this trainer to the peers' "
                   "emulated links and partitions (default: $SWARMRT_NET_RULES)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("status", help="show the runs, stages and peers announced in the DHT")
    _common(p, config=False)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="start a local swarm on 127.0.0.1 and train the example model")
    p.add_argument("--config", help="run config (default: examples/tiny_llama.toml settings)")
    p.add_argument("--stages", type=int, default=3, help="pipeline stages")
    p.add_argument("--peers-per-stage", type=int, default=2, help="peers serving each stage")
    p.add_argument("--trainers", type=int, default=1, help="trainer processes")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--workdir", help="keep logs and metrics here (default: a temporary folder)")
    p.add_argument("--chaos", action="store_true",
                   help="kill, hang and preempt random peers while training (seeded), add replacements, and "
                        "report what the run did about it")
    p.add_argument("--seed", type=int, default=0, help="--chaos: seed of the fault plan")
    p.add_argument("--faults", type=int, default=3, help="--chaos: how many faults to inject")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_demo)

    add_eval_parser(sub)
    add_export_parser(sub)
    add_plan_parser(sub)
    add_simulate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    for name in ("steps", "stages", "peers_per_stage", "trainers", "faults"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.exit(EXIT_USAGE, f"swarmrt {args.command}: error: --{name.replace('_', '-')} must be >= 1, "
                                    f"got {value}\n")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"swarmrt {args.command}: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as e:
        print(f"swarmrt {args.command}: checkpoint error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NetworkError as e:
        print(f"swarmrt {args.command}: network error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_NETWORK
    except KeyboardInterrupt:
        return 130
