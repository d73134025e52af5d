"""`--carla-servers`: one CARLA server per dask worker, episodes spread over the servers, and a lost
server costing only its episode in flight. Stand-in servers (tests/carla_standin.py) on a dask
cluster of threads in this process, so the workers reach the stand-ins."""

import pytest
from dask.distributed import LocalCluster

from pipeline.cluster import local_workers_for, parse_servers
from pipeline.datasets.collect import CollectConfig, collect
from pipeline.datasets.store import TransitionStore
from pipeline.errors import PipelineError
from pipeline.eval.runner import EvalConfig, evaluate
from tests.carla_standin import StandInFleet, StandInServer, active_fleet_client
from tests.carla_towns import straight_town
from tests.cli_helpers import assert_one_line_error, run_cli

A, B = ("localhost", 2000), ("localhost", 2002)
STEPS = 20  # per episode; an episode is STEPS + 1 world ticks (the reset ticks once)
ROUTES = """<routes>
  <route id="east" town="Straight"><waypoint x="5" y="1.75" z="0" yaw="0"/><waypoint x="120" y="1.75" z="0" yaw="0"/></route>
  <route id="west" town="Straight"><waypoint x="290" y="-1.75" z="0" yaw="180"/><waypoint x="150" y="-1.75" z="0" yaw="180"/></route>
</routes>"""


@pytest.fixture(scope="module")
def scheduler():
    """Two single-threaded dask workers in this process."""
    cluster = LocalCluster(n_workers=2, processes=False, threads_per_worker=1, dashboard_address=None)
    yield cluster.scheduler_address
    cluster.close()


@pytest.fixture
def fleet():
    return StandInFleet({A: StandInServer({"Straight": straight_town()}),
                         B: StandInServer({"Straight": straight_town()})}).active()


@pytest.fixture
def route_file(tmp_path):
    path = tmp_path / "straight.xml"
    path.write_text(ROUTES)
    return str(path)


def _collect(tmp_path, fleet, route_file, scheduler, episodes=4, policy="expert"):
    return collect(CollectConfig(out=str(tmp_path / "a.zarr"), episodes=episodes, route=route_file, max_steps=STEPS,
                                 policy=policy,
                                 scheduler=scheduler, carla_servers=(A, B),
                                 simulator={"client_factory": active_fleet_client}), progress=False)


def test_servers_parse_and_the_local_worker_count_follows_them():
    assert parse_servers("localhost:2000, gpu1:3000") == [("localhost", 2000), ("gpu1", 3000)]
    for bad, message in (("localhost", "is not host:port"), ("h:0", "is not host:port"), ("h:2000,h:2000", "twice")):
        with pytest.raises(PipelineError, match=message):
            parse_servers(bad)
    assert local_workers_for([A, B], 0, None) == 2
    with pytest.raises(PipelineError, match="does not match the 2 --carla-servers"):
        local_workers_for([A, B], 3, None)


def test_episodes_are_spread_over_the_servers(tmp_path, fleet, route_file, scheduler):
    summary = _collect(tmp_path, fleet, route_file, scheduler, policy="autopilot")
    assert summary["episodes_committed"] == 4 and summary["server_events"] == []
    # each worker's TrafficManager listens on a port of its own (both run on this machine)
    assert set(fleet.servers[A].traffic_managers) == {8000} and set(fleet.servers[B].traffic_managers) == {8001}
    started = {address: server.episodes_started for address, server in fleet.servers.items()}
    assert sum(started.values()) == 4 and min(started.values()) >= 1, started  # both servers drove
    store = TransitionStore(str(tmp_path / "a.zarr"))
    by_seed = dict(zip(store.episodes["seed"].tolist(), [store.routes[i] for i in store.episodes["route"]]))
    # the episodes are split between the file's routes in consecutive blocks
    assert by_seed == {0: f"{route_file}#east", 1: f"{route_file}#east", 2: f"{route_file}#west", 3: f"{route_file}#west"}
    for server in fleet.servers.values():  # every worker handed its server back
        assert server.world.settings.synchronous_mode is False and server.world.alive("vehicle") == []


def test_a_lost_server_costs_only_its_episode_in_flight(tmp_path, fleet, route_file, scheduler):
    fleet.servers[B].crash_after_ticks(STEPS + 1 + 5)  # dies in the middle of its second episode
    summary = _collect(tmp_path, fleet, route_file, scheduler, episodes=6)
    store = TransitionStore(str(tmp_path / "a.zarr"))
    assert sorted(store.episodes["seed"].tolist()) == [0, 1, 2, 3, 4, 5]  # each once, none lost
    assert (store.episodes["length"] == STEPS).all()  # whole episodes only: the cut one ran again
    (event,) = summary["server_events"]
    assert "CARLA server localhost:2002 stopped answering during episode seed" in event
    assert "running that again on localhost:2000" in event
    a, b = fleet.servers[A], fleet.servers[B]
    assert b.episodes_started == 2 and a.episodes_started == 6 - 1  # B finished one; A ran the rest, retry included


def test_with_every_server_lost_the_run_stops_and_keeps_what_was_committed(tmp_path, fleet, route_file, scheduler):
    for server in fleet.servers.values():
        server.crash_after_ticks(2 * (STEPS + 1) + 3)
    with pytest.raises(PipelineError, match="every CARLA server stopped answering .* continue with --resume"):
        _collect(tmp_path, fleet, route_file, scheduler, episodes=8)
    store = TransitionStore(str(tmp_path / "a.zarr"))
    assert store.num_episodes == 4 and (store.episodes["length"] == STEPS).all()


def test_eval_over_servers_reports_every_episode_and_the_lost_server(tmp_path, fleet, route_file, scheduler):
    fleet.servers[A].crash_after_ticks(STEPS + 1 + 5)
    report = evaluate(EvalConfig(out=str(tmp_path / "eval"), routes=(route_file,), episodes=2, max_steps=STEPS,
                                 scheduler=scheduler, carla_servers=(A, B),
                                 simulator={"client_factory": active_fleet_client}), progress=False)
    assert sorted((e["route"], e["seed"]) for e in report["episodes"]) == [
        (f"{route_file}#east", 0), (f"{route_file}#east", 1), (f"{route_file}#west", 0), (f"{route_file}#west", 1)]
    assert report["carla_servers"] == ["localhost:2000", "localhost:2002"]
    (event,) = report["server_events"]
    assert "localhost:2000 stopped answering during the episode of expert" in event
    assert report["summary"]["expert"]["leaderboard"]["routes"] == 2


def test_servers_options_fail_in_one_line_before_anything_is_written(tmp_path, route_file):
    out = tmp_path / "a.zarr"
    line = assert_one_line_error(run_cli("collect", "--route", route_file, "--carla-servers", "127.0.0.1:9",
                                         "--out", out, "--quiet"), "127.0.0.1:9")
    assert "no CARLA server" in line and not out.exists()
    assert_one_line_error(run_cli("collect", "--route", "racetrack", "--carla-servers", "nohost", "--out", out),
                          "is not host:port")
    assert_one_line_error(run_cli("eval", "--route", "racetrack", "--carla-servers", "127.0.0.1:9",
                                  "--out", tmp_path / "ev"), "--carla-servers is for CARLA routes")
    assert not out.exists() and not (tmp_path / "ev").exists()
