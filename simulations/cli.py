"""``medseg``: the one command-line entry point.

Subcommands
-----------
simulate     run a multi-site federation on one machine (Flower simulation engine)
check-data   integrity report of a site directory (dataset.json + images)
adapt        test-time adaptation of a new site's private layers to a global model
certs        a federation CA, the SuperLink's TLS certificate and sites' node keys
server       start a SuperLink (TLS + SuperNode authentication) and run the federation
nodes        register (add) or remove a site's SuperNode key on the running server
client       start one hospital's SuperNode (its site config stays on the site)
make-site    write one site of a scenario (synthetic data + its private site.yaml)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from medseg_core.errors import MedsegError

__all__ = ["main"]

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "configs" / "default.yaml"


def _cmd_simulate(args: argparse.Namespace) -> int:
    from medseg_core.config import load_scenario

    from simulations.runner import SimulationOptions, format_table, run_simulate

    scenario = load_scenario(args.config)
    out = Path(args.out) if args.out else Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    dp = None if args.dp is None else args.dp == "on"
    summary = run_simulate(
        scenario,
        SimulationOptions(out_dir=out, baselines=args.baselines, quick=args.quick, dp=dp,
                          verbose=args.verbose, compare=args.compare),
    )
    print()
    print(format_table(summary))
    print(f"summary: {out / 'summary.json'}")
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from medseg_core.data.integrity import check_site

    report = check_site(args.site_dir)
    if args.json:
        print(json.dumps({
            "site_dir": str(report.site_dir), "n_cases": report.n_cases, "ok": report.ok,
            "problems": [p.__dict__ for p in report.problems],
        }, indent=2, default=str))
    else:
        print(report.format())
    return 0 if report.ok else 1


def _cmd_adapt(args: argparse.Namespace) -> int:
    from medseg_core.checkpoint import load_checkpoint
    from medseg_core.config import DataConfig, ModelConfig, load_site_config, parse_model
    from medseg_core.training.site import SiteSession

    ck = load_checkpoint(args.checkpoint)
    cfg = ck.meta.get("config", {})
    model_cfg = parse_model(ModelConfig, cfg.get("model", {}), source=f"{args.checkpoint} model")
    data_cfg = parse_model(DataConfig, cfg.get("data", {}), source=f"{args.checkpoint} data")
    site = load_site_config(args.site)
    sess = SiteSession(site, model_cfg=model_cfg, data_cfg=data_cfg)
    run_name = str(ck.meta.get("run_id", args.checkpoint))
    has_masks = all(c.label is not None for c in sess.datalist.split("test"))

    def dice() -> float | None:
        if not has_masks or not sess.datalist.split("test"):
            return None
        return sess.evaluate(ck.arrays, "test", run_name=run_name, model_round=ck.round,
                             min_component_voxels=args.min_component_voxels).dice

    before = dice()
    res = sess.test_time_adapt(ck.arrays, run_name, ck.round, epochs=args.epochs, lr=args.lr)
    report = {
        "site": site.id, "checkpoint": str(args.checkpoint), "round": ck.round,
        "steps": res.steps, "entropy_before": res.entropy_before,
        "entropy_after": res.entropy_after, "test_dice_before": before, "test_dice_after": dice(),
    }
    print(json.dumps(report, indent=2))
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from server.certs import create_ca_and_server, create_node_keys

    out = Path(args.out)
    if args.san:
        p = create_ca_and_server(out, sans=list(args.san), overwrite=args.force)
        print(f"CA certificate (give to every site): {p.ca_cert}")
        print(f"server certificate / key (SuperLink only): {p.server_cert} / {p.server_key}")
    for site in args.node or []:
        priv, pub = create_node_keys(out, site, overwrite=args.force)
        print(f"site {site}: private key {priv} (stays at the site), public key {pub} "
              "(register it on the server)")
    if not args.san and not args.node:
        print("nothing to do: pass --san HOST for the CA and server certificate and/or "
              "--node SITE_ID for a site's key pair", file=sys.stderr)
        return 2
    return 0


def _server_home(workdir: str) -> Path:
    return Path(workdir).resolve() / "flwr-home"


def _cmd_server(args: argparse.Namespace) -> int:
    from medseg_core.config import load_scenario

    from server import deploy

    scenario = load_scenario(args.config)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    home = _server_home(args.workdir)
    name_file = workdir / "run-name"
    if args.resume:
        if not name_file.is_file():
            print(f"medseg: error: --resume but {workdir} holds no run (no {name_file.name}); "
                  "start without --resume", file=sys.stderr)
            return 2
        run_name = name_file.read_text(encoding="utf-8").strip()
    else:
        run_name = f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        name_file.write_text(run_name, encoding="utf-8")
    certs = None if args.insecure else Path(args.certs).resolve()
    link = deploy.start_superlink(
        certs, port=args.port, host=args.host, flwr_home=home, log=workdir / "superlink.log",
        database=workdir / "superlink.db", insecure=args.insecure,
    )
    (workdir / "superlink.pid").write_text(str(link.pid), encoding="utf-8")
    try:
        deploy.wait_for_port(args.port, args.host, timeout=60)
        deploy.write_connection(home, f"{args.host}:{args.port}",
                                None if certs is None else certs / "ca.crt")
        print(f"SuperLink up on {args.host}:{args.port} (pid {link.pid}, "
              f"{'INSECURE' if args.insecure else 'TLS + SuperNode authentication'}); register "
              f"sites with `medseg nodes add KEY.pub --workdir {args.workdir}`", flush=True)
        need = args.min_nodes or len(scenario.sites)
        deadline = time.monotonic() + args.wait
        while len(deploy.online_nodes(home)) < need:
            if time.monotonic() > deadline or link.popen.poll() is not None:
                print(f"medseg: error: {len(deploy.online_nodes(home)) if link.popen.poll() is None else 0}"
                      f" of {need} sites online after {args.wait:.0f} s; check the sites' "
                      "`medseg client` logs and that their keys are registered", file=sys.stderr)
                return 3
            time.sleep(2)
        if args.resume:
            stale = deploy.stop_unfinished_runs(home)
            if stale:
                print(f"stopped the interrupted Flower run(s) {', '.join(stale)}", flush=True)
        print(f"{need} site(s) online; running {scenario.name} ({scenario.rounds} rounds)", flush=True)
        rc = deploy.run_federation_remote(Path(args.config), workdir, home,
                                          log=workdir / "run.log", run_name=run_name,
                                          resume=args.resume)
        fed = workdir / "server" / "federated.json"
        if rc != 0 or not fed.is_file():
            print(f"medseg: error: the run failed (flwr exit {rc}); see {workdir / 'run.log'}",
                  file=sys.stderr)
            return 1
        print(fed.read_text(encoding="utf-8"))
        return 0
    finally:
        if not args.keep_running:
            deploy.stop(link)


def _cmd_nodes(args: argparse.Namespace) -> int:
    from server import deploy

    home = _server_home(args.workdir)
    if args.action == "add":
        node_id = deploy.register_node(Path(args.target), home, name=args.name)
        print(f"registered {args.target} as node {node_id}")
    else:
        deploy.unregister_node(args.target, home)
        print(f"removed node {args.target}")
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    import os

    from server import deploy

    cmd = deploy.supernode_command(
        site_yaml=Path(args.site), server=args.server,
        ca_cert=None if args.insecure else Path(args.ca), private_key=Path(args.key) if args.key else None,
        port=args.port, insecure=args.insecure,
    )
    home = Path(args.state or Path(args.site).resolve().parent / "flwr-home")
    print(f"starting SuperNode for {args.site} -> {args.server}", flush=True)
    if args.cold:  # Flower's default: a fresh flwr-clientapp process per message
        os.execve(cmd[0], cmd, deploy.deploy_env(home))
    from client import warm

    return warm.run_site(cmd, deploy.deploy_env(home), port=args.port,
                         secret_file=home / "superexec.secret")


def _cmd_make_site(args: argparse.Namespace) -> int:
    from medseg_core.config import load_scenario
    from medseg_core.errors import ConfigError
    from medseg_core.sites import materialise_site

    scenario = load_scenario(args.config).for_privacy()
    specs = {s.id: s for s in scenario.sites}
    if args.site not in specs:
        raise ConfigError(f"site {args.site!r} is not in {args.config}; its sites: {sorted(specs)}")
    site = materialise_site(specs[args.site], scenario, Path(args.out))
    path = Path(args.out).resolve() / "sites" / site.id / "site.yaml"
    if args.state_dir or args.site_yaml:
        from medseg_core.sites import write_site_config

        if args.state_dir:
            site = site.model_copy(update={"state_dir": Path(args.state_dir).resolve()})
        path.unlink()
        path = Path(args.site_yaml).resolve() if args.site_yaml else path
        write_site_config(site, path)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``medseg`` argument parser."""
    p = argparse.ArgumentParser(prog="medseg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="simulate N hospitals end to end on this machine")
    s.add_argument("--config", default=str(DEFAULT_SCENARIO),
                   help="scenario YAML (default: the built-in default scenario)")
    s.add_argument("--out", help="output directory (default: runs/<scenario>-<time>)")
    s.add_argument("--baselines", action="store_true",
                   help="also train pooled and local-only models at equal compute")
    s.add_argument("--quick", action="store_true", help="smaller, 2-round smoke run")
    s.add_argument("--compare", action="store_true",
                   help="also run the scenario with every synthetic site given full masks and "
                        "report weak/full Dice per weak-label site")
    s.add_argument("--dp", choices=["on", "off"], default=None,
                   help="override the scenario's privacy.enabled")
    s.set_defaults(func=_cmd_simulate)

    c = sub.add_parser("check-data", help="integrity report of a site directory")
    c.add_argument("site_dir", help="directory holding dataset.json")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=_cmd_check_data)

    a = sub.add_parser("adapt", help="test-time adaptation of a site that never trained")
    a.add_argument("--site", required=True, help="the site's private site.yaml")
    a.add_argument("--checkpoint", required=True, help="a global model checkpoint directory")
    a.add_argument("--epochs", type=int, default=5, help="passes over the unlabeled images")
    a.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    a.add_argument("--min-component-voxels", type=int, default=0,
                   help="post-processing for the before/after test Dice")
    a.set_defaults(func=_cmd_adapt)

    k = sub.add_parser("certs", help="CA, SuperLink TLS certificate and site node keys")
    k.add_argument("--out", default="certs", help="output directory (default: ./certs)")
    k.add_argument("--san", action="append",
                   help="host name or IP the sites dial (repeat); creates the CA + server cert")
    k.add_argument("--node", action="append", help="site id to create a node key pair for (repeat)")
    k.add_argument("--force", action="store_true", help="overwrite existing keys/certificates")
    k.set_defaults(func=_cmd_certs)

    sv = sub.add_parser("server", help="start a SuperLink and run the federation over it")
    sv.add_argument("--config", required=True, help="scenario/run YAML (model, strategy, rounds)")
    sv.add_argument("--certs", default="certs", help="directory from `medseg certs`")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=9092, help="SuperLink HTTPS port")
    sv.add_argument("--workdir", default="runs/server", help="run store, checkpoints, logs")
    sv.add_argument("--min-nodes", type=int, default=None,
                    help="sites that must be online to start (default: the scenario's sites)")
    sv.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the sites")
    sv.add_argument("--keep-running", action="store_true", help="leave the SuperLink up afterwards")
    sv.add_argument("--resume", action="store_true",
                    help="continue the run in --workdir after its last completed round "
                         "(checkpoint + run store; sites keep their own state)")
    sv.add_argument("--insecure", action="store_true",
                    help="NO TLS (development only; every update crosses the network unencrypted)")
    sv.set_defaults(func=_cmd_server)

    nd = sub.add_parser("nodes", help="register or remove a site's SuperNode key")
    nd.add_argument("action", choices=["add", "remove"])
    nd.add_argument("target", help="KEY.pub to add, or a node id to remove")
    nd.add_argument("--workdir", default="runs/server", help="the server's --workdir")
    nd.add_argument("--name", default=None, help="a name for the node (add)")
    nd.set_defaults(func=_cmd_nodes)

    cl = sub.add_parser("client", help="start one hospital's SuperNode")
    cl.add_argument("--site", required=True, help="the site's private site.yaml")
    cl.add_argument("--server", required=True, help="SuperLink HOST:PORT")
    cl.add_argument("--ca", default="certs/ca.crt", help="the federation's CA certificate")
    cl.add_argument("--key", default=None, help="the site's private node key (OpenSSH)")
    cl.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's API")
    cl.add_argument("--state", default=None, help="Flower's home for this SuperNode")
    cl.add_argument("--insecure", action="store_true", help="NO TLS (development only)")
    cl.add_argument("--cold", action="store_true",
                    help="Flower's default isolation: a new ClientApp process (cold torch import) "
                         "per message, instead of the warm fork-server executor")
    cl.set_defaults(func=_cmd_client)

    ms = sub.add_parser("make-site", help="write one site of a scenario (data + site.yaml)")
    ms.add_argument("--config", required=True, help="scenario YAML")
    ms.add_argument("--site", required=True, help="the site id")
    ms.add_argument("--out", required=True, help="directory for data/<id> and sites/<id>/site.yaml")
    ms.add_argument("--state-dir", default=None,
                    help="the site's writable state directory (default: under --out)")
    ms.add_argument("--site-yaml", default=None, help="where to write site.yaml instead")
    ms.set_defaults(func=_cmd_make_site)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medseg`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except MedsegError as exc:
        print(f"medseg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
