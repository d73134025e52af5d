"""The ``pipeline`` command line. Thin: parses options and calls the stage functions.

Errors a user can fix (:class:`pipeline.errors.PipelineError`) print as one line on stderr and
exit non-zero; Ctrl-C exits 130 after the stage has saved what it had. SIGTERM (``kill``,
``docker stop``, a batch scheduler's preemption) is handled as Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from datetime import datetime
from pathlib import Path

import click

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.eval.seeds import VALIDATION_SEED

#: what collect says when interrupted: the store holds whole episodes only, --resume records the rest
_COLLECT_INTERRUPTED = "interrupted: committed episodes are kept; continue with --resume"


def _default_run_name(suffix: str = "") -> str:
    return f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}{suffix}"


def _echo_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pipeline")
def cli():
    """Offline-first datasets and end-to-end TD3 for driving RL.

    \b
    pipeline collect --episodes 200 --out runs/a.zarr       record a dataset (embedded simulator)
    pipeline datasets info runs/a.zarr                       what is in it
    pipeline routes                                          the routes you can drive
    """


def carla_options(command):
    """``--carla-host/--carla-port`` for every command that may drive CARLA (ignored by embedded routes)."""
    command = click.option("--carla-port", type=int, default=None, envvar="CARLA_PORT",
                           help="CARLA server port [env CARLA_PORT, default 2000].")(command)
    return click.option("--carla-host", default=None, envvar="CARLA_HOST",
                        help="CARLA server host [env CARLA_HOST, default localhost].")(command)


def cluster_options(command):
    """``--workers``, ``--scheduler`` and ``--carla-servers``: where collect and eval run episodes."""
    command = click.option("--carla-servers", default=None, help=SERVERS_HELP)(command)
    command = click.option("--scheduler", default=None,
                           help="Address of an existing dask scheduler to run episodes on.")(command)
    return click.option("--workers", type=int, default=0, show_default=True,
                        help="Run episodes on a local dask cluster of N processes.")(command)


def no_verify_option(command):
    """``--no-verify`` for every command that reads a store's chunks (all check them by default)."""
    return click.option("--no-verify", is_flag=True,
                        help="Do not check each chunk read against its recorded sha256.")(command)


def camera_option(note: str = ""):
    """``--camera`` for the commands that build an env from options; ``note`` ends its help."""
    return click.option("--camera", type=click.Choice(["bev", "front"]), default=None,
                        help="What the frames show: bev (car-mounted bird's-eye view, both backends) "
                             f"or front (bonnet camera, CARLA only) [default: bev].{note}")


def _carla_kwargs(host, port) -> dict:
    return {k: v for k, v in (("host", host), ("port", port)) if v is not None}


SERVERS_HELP = ("CARLA servers host:port,host:port,...: one per dask worker (--workers defaults to their "
                "number); an episode whose server dies runs again on another.")


def _servers(text: str | None) -> tuple:
    from pipeline.cluster import parse_servers

    return tuple(parse_servers(text)) if text else ()


ROUTE_HELP = "Route name (see `pipeline routes`), or a Leaderboard route file: FILE.xml (all its routes) or FILE.xml#ID."


def _note_ignored_scenarios(route_specs) -> None:
    """One line per Leaderboard route file whose scenarios are not run."""
    from pipeline.envs.route_files import is_route_file, scenario_note

    for spec in route_specs:
        note = scenario_note(spec) if spec and is_route_file(spec) else None
        if note:
            click.echo(note)


# ---------------------------------------------------------------------------------------------
@cli.command()
@click.option("--episodes", type=int, default=200, show_default=True, help="Episodes the store should hold.")
@click.option("--out", default=None, help="Store path or fsspec URL [default: runs/<timestamp>.zarr].")
@click.option("--route", default="racetrack", show_default=True, help=ROUTE_HELP)
@click.option("--policy", default="expert", show_default=True,
              help="expert (scripted route follower), random, autopilot (CARLA TrafficManager), or a checkpoint .pt path.")
@click.option("--noise", type=float, default=0.0, show_default=True, help="Gaussian action noise std.")
@click.option("--seed", type=int, default=0, show_default=True, help="Episode i is reset with seed+i.")
@click.option("--traffic", type=int, default=None, help="Other vehicles (only the image shows them).")
@click.option("--vector-fields", default=None,
              help="Comma-separated vector fields, e.g. 'speed' [default: all 23].")
@click.option("--max-steps", type=int, default=None, help="Step limit per episode [default: the route's].")
@cluster_options
@click.option("--resume", is_flag=True, help="Continue an existing store up to --episodes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@camera_option()
@carla_options
def collect(episodes, out, route, policy, noise, seed, traffic, vector_fields, max_steps, workers, scheduler,
            carla_servers, resume, overwrite, quiet, camera, carla_host, carla_port):
    """Drive a policy and record raw dict transitions into a Zarr store.

    \b
    Examples:
      pipeline collect --episodes 200 --out runs/a.zarr
      pipeline collect --episodes 50 --policy expert --noise 0.1 --out runs/noisy.zarr
      pipeline collect --episodes 200 --out runs/a.zarr --resume      # after Ctrl-C or a crash
      pipeline collect --episodes 500 --workers 2 --out runs/big.zarr
      pipeline collect --route routes_devtest.xml --policy autopilot --episodes 40 --out runs/lb.zarr
    """
    from pipeline.datasets.collect import CollectConfig, collect as run_collect

    _note_ignored_scenarios([route])
    if resume and overwrite:
        raise PipelineError("--resume and --overwrite exclude each other")
    config = CollectConfig(
        out=out or _default_run_name(".zarr"), episodes=episodes, route=route, policy=policy, noise=noise,
        seed=seed, traffic=traffic, vector_fields=vector_fields, camera=camera, max_steps=max_steps,
        workers=workers, scheduler=scheduler, mode="append" if resume else "overwrite" if overwrite else "create",
        simulator=_carla_kwargs(carla_host, carla_port), carla_servers=_servers(carla_servers),
    )
    try:
        summary = run_collect(config, progress=not quiet)
    except KeyboardInterrupt:
        # a second interrupt while the last commit ran, or one after it (a dask cluster closing)
        click.echo(_COLLECT_INTERRUPTED, err=True)
        sys.exit(130)
    click.echo(
        f"{summary['episodes_committed']}/{episodes} episodes in {config.out}: "
        f"{summary['steps']} steps recorded at {summary['steps_per_s']:.0f} steps/s, "
        f"mean return {summary['mean_return']:.2f}, "
        f"mean route completion {summary['mean_route_completion']:.2f}, "
        f"endings {summary['terminations']}"
    )
    _say_lost_servers(summary["server_events"])
    if summary["interrupted"]:
        click.echo(_COLLECT_INTERRUPTED, err=True)
        sys.exit(130)


def _say_lost_servers(events: list[str]) -> None:
    if events:
        click.echo(f"{len(events)} episode(s) ran again after their CARLA server stopped answering; "
                   f"see the warnings above", err=True)


# ---------------------------------------------------------------------------------------------
@cli.command()
@click.option("--data", default=None, help="Dataset store path or fsspec URL. Without it: pure online.")
@click.option("--data-cache", default=None, help="Local folder caching a remote --data store's chunks.")
@click.option("--online-mix", type=float, default=0.5, show_default=True,
              help="Share of each batch from fresh rollouts; 0 = pure offline.")
@click.option("--route", default=None,
              help="Route for rollouts [default: the dataset's, else racetrack]; FILE.xml drives its routes in turn.")
@click.option("--steps", type=int, default=None,
              help="Gradient updates [default: 3000 on CPU, 100000 on CUDA; on --resume the run's].")
@click.option("--batch-size", type=int, default=None,
              help="[default: 64 on CPU, 256 on CUDA; on --resume the run's].")
@click.option("--online-every", type=int, default=50, show_default=True,
              help="Updates between rollout chunks; 0 disables rollouts.")
@click.option("--online-steps", type=int, default=None, help="Env steps per rollout chunk [default: --online-every].")
@click.option("--exploration-noise", type=float, default=0.1, show_default=True)
@click.option("--warmup-steps", type=int, default=1000, show_default=True,
              help="Random-action env steps before learning (pure online only).")
@click.option("--encoder-update", type=click.Choice(["critic", "actor+critic", "frozen"]), default="critic",
              show_default=True, help="Which losses train the CNN (frozen = never: the broken baseline).")
@click.option("--lr", type=float, default=3e-4, show_default=True,
              help="Adam learning rate of actor and critic (SB3's TD3 uses 1e-3).")
@click.option("--encoder-lr", type=float, default=3e-4, show_default=True,
              help="Adam learning rate of the CNN (DrQ-v2 uses 1e-4).")
@click.option("--encoder-head", type=click.Choice(["relu", "layernorm"]), default="relu", show_default=True,
              help="The CNN's last layer: relu (Nature DQN) or layernorm (LayerNorm + tanh, as SAC-AE and DrQ).")
@click.option("--bc-alpha", type=float, default=None,
              help="TD3+BC alpha on the dataset's rows; 0 = off [default: 2.5 with --data, else 0].")
@click.option("--prediction-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of a self-predictive loss on the CNN (SPR-style: predict the next observation's "
                   "CNN features from this one's and the action); 0 = off. Not with --encoder-update frozen.")
@click.option("--n-step", type=int, default=3, show_default=True)
@click.option("--gamma", type=float, default=0.99, show_default=True)
@click.option("--no-augment", is_flag=True, help="Disable random-shift augmentation.")
@click.option("--replay-memory", default="4GiB", show_default=True, help="RAM budget for offline frames.")
@click.option("--online-capacity", type=int, default=100_000, show_default=True, help="Online ring transitions.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the networks.")
@click.option("--bf16/--no-bf16", default=None,
              help="The CNN's convolutions in bf16 [default: where the device has native bf16: CUDA, a CPU "
                   "with AVX512-BF16/AMX; elsewhere fp32]. --no-bf16 keeps fp32.")
@click.option("--checkpoint-every", type=int, default=10_000, show_default=True)
@click.option("--eval-every", type=int, default=0, show_default=True,
              help="Evaluate every M updates on the validation seeds and keep the best policy in best.pt; 0 = never.")
@click.option("--eval-episodes", type=int, default=2, show_default=True)
@click.option("--eval-seed", type=int, default=VALIDATION_SEED, show_default=True,
              help="First validation seed of --eval-every; kept apart from `pipeline eval`'s seeds (0, 1, ...) "
                   "so that choosing best.pt does not see the test.")
@click.option("--log-every", type=int, default=100, show_default=True)
@click.option("--vector-fields", default=None, help="Without --data: vector fields, e.g. 'speed'.")
@click.option("--traffic", type=int, default=None, help="Without --data: other vehicles.")
@click.option("--out", default=None, help="Run folder [default: runs/<timestamp>].")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last.pt, with its options; a changed learner option is refused.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@no_verify_option
@camera_option(" Without --data only: a dataset brings its own.")
@carla_options
def train(data, data_cache, online_mix, route, steps, batch_size, online_every, online_steps, exploration_noise,
          warmup_steps, encoder_update, lr, encoder_lr, encoder_head, bc_alpha, prediction_weight, n_step, gamma,
          no_augment, replay_memory, online_capacity, device, compile_, bf16, checkpoint_every, eval_every,
          eval_episodes, eval_seed, log_every, vector_fields, traffic, out, resume, seed, quiet, no_verify, camera,
          carla_host, carla_port):
    """Train end-to-end TD3 (the CNN learns from the TD3 losses) from a dataset plus online rollouts.

    \b
    Examples:
      pipeline train --data runs/a.zarr --online-mix 0.5 --out runs/td3
      pipeline train --data runs/a.zarr --online-mix 0                   # pure offline, TD3+BC
      pipeline train --route racetrack --vector-fields speed --traffic 3  # pure online, image needed
      pipeline train --out runs/td3 --resume                              # continue after Ctrl-C
    """
    from pipeline.train.loop import TrainConfig, train as run_train

    if resume and out is None:
        raise PipelineError("--resume needs the --out of the run to continue")
    _note_ignored_scenarios([route])
    ctx = click.get_current_context()
    negated = {"no_augment": "augment"}  # flag -> the TrainConfig field it sets
    given = tuple(negated.get(name, name) for name in ctx.params
                  if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT)
    config = TrainConfig(
        out=out or _default_run_name(), data=data, data_cache=data_cache, route=route, steps=steps, batch_size=batch_size,
        online_mix=online_mix, online_every=online_every, online_steps=online_steps,
        exploration_noise=exploration_noise, warmup_steps=warmup_steps, online_capacity=online_capacity,
        replay_memory=replay_memory, n_step=n_step, gamma=gamma, encoder_update=encoder_update,
        lr=lr, encoder_lr=encoder_lr, encoder_head=encoder_head, bc_alpha=bc_alpha, augment=not no_augment,
        prediction_weight=prediction_weight, device=device,
        compile=compile_, bf16=bf16, seed=seed, checkpoint_every=checkpoint_every,
        eval_every=eval_every, eval_episodes=eval_episodes, eval_seed=eval_seed, log_every=log_every,
        vector_fields=vector_fields, traffic=traffic, camera=camera, resume=resume, given=given, simulator=_carla_kwargs(carla_host, carla_port),
        verify=not no_verify,
    )
    try:
        summary = run_train(config, progress=not quiet)
    except KeyboardInterrupt:
        # an interrupt while the run was set up, or a second one while the last checkpoint was written
        last = Path(config.out) / "last.pt"
        click.echo(f"interrupted: {last} is the last checkpoint saved; continue with --resume --out {config.out}"
                   if last.exists() else "interrupted before the first checkpoint; nothing to resume", err=True)
        sys.exit(130)
    recent = summary["recent_return"]
    click.echo(
        f"{summary['updates']} updates in {summary['out']} ({summary['updates_per_s']:.1f} updates/s), "
        f"{summary['env_steps']} env steps, {summary['episodes']} episodes"
        + (f", recent return {recent:.2f}" if recent is not None else "")
        + f"; checkpoint {summary['checkpoint']}"
    )
    best = summary["best"]
    if best is not None:
        click.echo(f"best on the validation seeds: {summary['best_checkpoint']} (update {best['update']}, "
                   f"route completion {best['route_completion']:.1f}%, driving score {best['driving_score']:.1f})")
    if summary["interrupted"]:
        click.echo(f"interrupted: saved {summary['checkpoint']}; continue with --resume --out {summary['out']}",
                   err=True)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
@cli.command()
@click.option("--backend", type=click.Choice(["embedded", "carla"]), default=None, help="Only this backend.")
@click.option("--file", "route_file", default=None,
              help="A Leaderboard route file (1.0 or 2.x XML): list its routes instead.")
@click.option("--xodr", default=None,
              help="With --file: an OpenDRIVE map (TownNN.xodr); plan that town's routes offline.")
@click.option("--json", "as_json", is_flag=True, help="With --file: print the listing as JSON.")
def routes(backend, route_file, xodr, as_json):
    """List the named routes with backend and length, or the routes of a Leaderboard file.

    With --xodr, a route that cannot be planned is listed with the waypoint it cannot reach, and
    the command exits 1.

    \b
    Examples:
      pipeline routes --backend embedded
      pipeline routes --file routes_devtest.xml
      pipeline routes --file routes_devtest.xml --xodr Town01.xodr --json
    """
    if route_file is None:
        if xodr or as_json:
            raise PipelineError("--xodr and --json go with --file FILE.xml")
        from pipeline.envs import list_routes
        from pipeline.terminal import print_routes

        print_routes(list_routes(backend))
        return
    from pipeline.envs.route_files import describe_route_file, route_file_lines

    description = describe_route_file(route_file, xodr)
    if as_json:
        _echo_json(description)
    else:
        for line in route_file_lines(description):
            click.echo(line)
    if any("unplannable" in row for row in description["routes"]):
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
@cli.group()
def datasets():
    """Inspect and share dataset stores (paths or fsspec URLs).

    \b
    Remote URLs (s3://, gs://, ...) take credentials and endpoints from the environment or
    fsspec's config, e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and FSSPEC_S3_ENDPOINT_URL;
    nothing of them is written into a store. See docs/sharing.md.
    """


@datasets.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@no_verify_option
def info(path, as_json, no_verify):
    """Episodes, transitions, returns, routes, policy, spec, bytes and provenance of a store.

    \b
    Example:
      pipeline datasets info runs/a.zarr
    """
    from pipeline.datasets.store import TransitionStore

    summary = TransitionStore(path, verify=not no_verify, allow_unfinished=True).summary()
    if as_json:
        _echo_json(summary)
        return
    from pipeline.datasets.report import print_summary

    print_summary(path, summary)


def _copy(src: str, dst: str, overwrite: bool, quiet: bool, no_verify: bool) -> None:
    from pipeline.datasets.remote import copy_store

    try:
        result = copy_store(src, dst, overwrite=overwrite, progress=not quiet, verify=not no_verify)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to resume the copy", err=True)
        sys.exit(130)
    from pipeline.datasets.report import copy_line

    click.echo(copy_line(result))


def copy_options(destination: str):
    """``--overwrite``, ``--quiet`` and ``--no-verify`` of ``push`` and ``pull``."""

    def decorate(command):
        command = no_verify_option(command)
        command = click.option("--quiet", is_flag=True, help="No progress bar.")(command)
        return click.option("--overwrite", is_flag=True, help=f"Replace another dataset store at {destination}.")(command)

    return decorate


@datasets.command()
@click.argument("src")
@click.argument("url")
@copy_options("URL")
def push(src, url, overwrite, quiet, no_verify):
    """Copy the store SRC to URL, resumably, then verify the copy.

    Chunks already at URL with the same size and checksum are skipped: re-run after an
    interruption to resume, or after SRC grew to send only what changed.

    \b
    Example:
      pipeline datasets push runs/a.zarr s3://team-bucket/datasets/a.zarr
    """
    _copy(src, url, overwrite, quiet, no_verify)


@datasets.command()
@click.argument("url")
@click.argument("dst")
@copy_options("DST")
def pull(url, dst, overwrite, quiet, no_verify):
    """Copy the store at URL to DST, resumably, then verify the copy.

    \b
    Example:
      pipeline datasets pull s3://team-bucket/datasets/a.zarr data/a.zarr
    """
    _copy(url, dst, overwrite, quiet, no_verify)


@datasets.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(path, as_json, quiet):
    """Check a store: format, spec, episodes table, array lengths and every chunk's checksum.

    Prints each problem found (missing chunk, corrupt chunk, truncated array, ...) and exits 1
    if there is any.

    \b
    Example:
      pipeline datasets verify s3://team-bucket/datasets/a.zarr
    """
    from pipeline.datasets.remote import verify_store

    report = verify_store(path, progress=not quiet and not as_json).to_dict()
    if as_json:
        _echo_json(report)
    else:
        from pipeline.datasets.report import print_verify

        print_verify(report)
    if not report["ok"]:
        sys.exit(1)


@datasets.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--out", required=True, help="The new merged store (path or URL).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset store already at --out.")
@click.option("--resume", is_flag=True, help="Complete an interrupted merge into --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@no_verify_option
def merge(sources, out, overwrite, resume, quiet, no_verify):
    """Concatenate stores with the same specs into a new store, recording each episode's source.

    An episode found in several sources (overlapping merges, a store and its copy) is written
    once. The output is marked unfinished until the last episode is in; --resume completes it.

    \b
    Examples:
      pipeline datasets merge runs/alice.zarr s3://team-bucket/bob.zarr -o runs/team.zarr
      pipeline datasets merge runs/alice.zarr s3://team-bucket/bob.zarr -o runs/team.zarr --resume
    """
    from pipeline.datasets.merge import merge_stores
    from pipeline.datasets.report import merge_lines

    result = merge_stores(list(sources), out, overwrite=overwrite, resume=resume, verify=not no_verify,
                          progress=not quiet)
    for line in merge_lines(result):
        click.echo(line)


@datasets.command()
@click.argument("path")
@click.option("--png", default=None, help="Also plot the statistics into this PNG file.")
@click.option("--bins", type=int, default=20, show_default=True, help="Histogram bins.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@no_verify_option
def stats(path, png, bins, as_json, no_verify):
    """Out-of-core statistics: vector mean/std per field, reward and action histograms.

    \b
    Example:
      pipeline datasets stats runs/a.zarr --png runs/a-stats.png
    """
    from pipeline.datasets.stats import dataset_stats

    result = dataset_stats(path, bins=bins, png=png, verify=not no_verify)
    if as_json:
        _echo_json(result)
        return
    from pipeline.datasets.report import print_stats

    print_stats(result)


# ---------------------------------------------------------------------------------------------
@cli.command("eval")
@click.option("--checkpoint", "checkpoints", multiple=True,
              help="TD3 checkpoint .pt to evaluate; repeat to compare several side by side.")
@click.option("--policy", "policies", multiple=True, type=click.Choice(["expert", "random", "autopilot"]),
              help="Scripted baseline on the same routes; repeatable [default: expert if no --checkpoint].")
@click.option("--route", "routes", multiple=True,
              help="Route name or route file (FILE.xml, FILE.xml#ID), repeatable [default: racetrack].")
@click.option("--episodes", type=int, default=5, show_default=True, help="Episodes per policy and route.")
@click.option("--seed", type=int, default=None,
              help="Episode i resets with seed+i [default: each route's evaluation seeds].")
@click.option("--max-steps", type=int, default=None, help="Step limit per episode [default: the route's].")
@click.option("--traffic", type=int, default=None, help="Other vehicles [default: the route's].")
@cluster_options
@click.option("--out", default=None,
              help="Report folder [default: <checkpoint folder>/eval for one checkpoint, else runs/<timestamp>-eval].")
@click.option("--video", is_flag=True, help="Save the first episode of each policy as MP4 (GIF without ffmpeg).")
@click.option("--trace", is_flag=True,
              help="Also write steps.csv: one row per step of every episode (action, reward, speed, route "
                   "completion, lane offset, gap to the car ahead, infractions), to see where a policy fails.")
@click.option("--overwrite", is_flag=True, help="Replace a report already in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar and no table.")
@camera_option(" For --policy; a checkpoint drives with the camera it was trained on.")
@carla_options
def eval_(checkpoints, policies, routes, episodes, seed, max_steps, traffic, workers, scheduler, carla_servers, out,
          video, trace, overwrite, quiet, camera, carla_host, carla_port):
    """Drive policies deterministically on fixed routes and seeds; report driving metrics.

    Per episode and in summary: route completion, collisions, off-route events, infractions per km,
    driving score (CARLA Leaderboard 1.0: completion x infraction penalty), return, length, ending.
    Writes report.json, episodes.csv and summary.png (videos with --video, steps.csv with --trace)
    into --out.

    \b
    Examples:
      pipeline eval --checkpoint runs/x/last.pt --route racetrack --route racetrack-oval
      pipeline eval --checkpoint runs/a/last.pt --checkpoint runs/b/last.pt --policy expert --video
      pipeline eval --policy expert --policy random --route racetrack --episodes 10 --workers 2
      pipeline eval --checkpoint runs/x/last.pt --route routes_devtest.xml --episodes 1
      pipeline eval --checkpoint runs/x/last.pt --seed 3 --episodes 1 --video --trace
    """
    from pathlib import Path

    from pipeline.eval.report import print_table
    from pipeline.eval.runner import EvalConfig, evaluate

    _note_ignored_scenarios(routes)
    if not checkpoints and not policies:
        click.echo("no --checkpoint given: evaluating the scripted expert as a reference")
        policies = ("expert",)
    if out is None:
        out = str(Path(checkpoints[0]).parent / "eval") if len(checkpoints) == 1 and not policies \
            else _default_run_name("-eval")
    config = EvalConfig(
        out=out, policies=tuple(checkpoints) + tuple(policies), routes=tuple(routes) or ("racetrack",),
        episodes=episodes, seed=seed, max_steps=max_steps, traffic=traffic, workers=workers, scheduler=scheduler,
        video=video, trace=trace, camera=camera, simulator=_carla_kwargs(carla_host, carla_port), overwrite=overwrite,
        carla_servers=_servers(carla_servers),
    )
    try:
        report = evaluate(config, progress=not quiet)
    except KeyboardInterrupt:
        # a report holds every episode asked for or none: there is nothing partial to keep
        click.echo(f"interrupted: no new report in {config.out}; run the same command again", err=True)
        sys.exit(130)
    if not quiet:
        print_table(report)
    _say_lost_servers(report["server_events"])
    files = report["files"]
    click.echo(f"report: {files['report']}  episodes: {files['episodes_csv']}  plot: {files['summary_png']}"
               + "".join(f"  video: {path}" for path in files["videos"].values())
               + (f"  steps: {files['steps_csv']}" if "steps_csv" in files else ""))


def main():
    # SIGTERM raises KeyboardInterrupt as Ctrl-C does: the stages' Ctrl-C paths save what they have
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # zarr reads concurrently on an asyncio loop; when one read fails (a refused store) the others
    # are abandoned, and asyncio would log "Task was destroyed but it is pending!" at exit under
    # the one-line error. The error itself is what the user needs.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        cli.main(standalone_mode=False)
    except PipelineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # a mistyped option or value: one line, and where to look
        command = exc.ctx.command_path if exc.ctx else "pipeline"
        click.echo(f"error: {exc.format_message()} (see `{command} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
