"""Run every benchmark and print the results table: ``python -m benchmarks.run [--quick]``.

Run it from the repository root with the environment crew_otel is installed in (``make bench``
does). It installs what it needs that the environment lacks (pyperf, the two competitors) into
``benchmarks/.deps/`` (see :mod:`benchmarks.deps`), writes the raw results to
``benchmarks/results/`` (``--quick``: ``benchmarks/results-quick/``) and prints the Markdown
table that is also written to ``summary.md`` there. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from benchmarks import common, deps, report


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much of everything to run."""

    startup_probes: int
    competitor_startup_probes: int
    #: Fresh processes that only ``import crew_otel`` (time, and the heavy modules it imports).
    import_probes: int
    hooks_pyperf: bool
    hooks_processes: int
    hooks_values: int
    e2e_blocks: int
    e2e_rounds: int
    e2e_kickoffs: int
    warmup_kickoffs: int
    concurrency_rounds: int
    concurrency_warmup: bool
    #: (label, mode, concurrency, kickoffs per measurement)
    concurrency_levels: tuple[tuple[str, str, int, int], ...]
    profile_kickoffs: int
    soak_kickoffs: int
    soak_warmup: int
    #: Shared-state detectors: interleaved end-to-end blocks, rounds, kickoffs per measurement.
    shared_blocks: int
    shared_rounds: int
    shared_kickoffs: int
    #: Shared-state detectors outside runs: pyperf processes and values per benchmark.
    detectors_processes: int
    detectors_values: int
    #: Flow + memory workload: interleaved end-to-end blocks, rounds, kickoffs per measurement,
    #: warm-up kickoffs per process.
    flow_blocks: int
    flow_rounds: int
    flow_kickoffs: int
    flow_warmup: int
    #: Seconds the whole run may spend waiting for other processes to calm down.
    quiet_budget: float
    #: Executed instructions (callgrind): warm-up kickoffs per process, measured windows.
    instructions_warmup: int
    instructions_windows: tuple[int, ...]
    #: Callgrind processes per variant (the result is the median process's).
    instructions_processes: int


FULL = Settings(
    startup_probes=15,
    competitor_startup_probes=2,
    import_probes=5,
    hooks_pyperf=True,
    hooks_processes=2,
    hooks_values=5,
    e2e_blocks=2,
    e2e_rounds=30,
    e2e_kickoffs=2,
    warmup_kickoffs=10,
    concurrency_rounds=8,
    concurrency_warmup=True,
    concurrency_levels=(
        ("1 thread", "threads", 1, 4),
        ("8 threads", "threads", 8, 8),
        ("32 threads", "threads", 32, 32),
        ("32 akickoff", "async", 32, 32),
    ),
    profile_kickoffs=20,
    soak_kickoffs=1000,
    soak_warmup=50,
    shared_blocks=2,
    shared_rounds=30,
    shared_kickoffs=3,
    detectors_processes=2,
    detectors_values=5,
    flow_blocks=2,
    flow_rounds=30,
    flow_kickoffs=1,
    flow_warmup=3,
    quiet_budget=600.0,
    instructions_warmup=3,
    instructions_windows=(3, 12),
    instructions_processes=1,
)
#: A smoke run: the same sections, a fraction of the repetitions (numbers, not statistics).
QUICK = dataclasses.replace(
    FULL,
    startup_probes=1,
    competitor_startup_probes=0,
    import_probes=1,
    hooks_pyperf=False,
    hooks_processes=1,
    hooks_values=1,
    e2e_blocks=1,
    e2e_rounds=2,
    warmup_kickoffs=1,
    concurrency_rounds=1,
    concurrency_warmup=False,
    concurrency_levels=(("1 thread", "threads", 1, 2), *FULL.concurrency_levels[1:]),
    profile_kickoffs=5,
    soak_kickoffs=100,
    soak_warmup=5,
    shared_blocks=1,
    shared_rounds=2,
    shared_kickoffs=2,
    flow_blocks=1,
    flow_rounds=2,
    flow_warmup=1,
    quiet_budget=20.0,
    instructions_windows=(3,),
)
SECTIONS = (
    "startup",
    "hooks",
    "e2e",
    "flow-memory",
    "shared-state",
    "soak",
    "report",
    "instructions",
)
QUIET = common.QUIET
DISTURBED = common.DISTURBED
#: Longest wait for a quiet machine before one round.
MAX_WAIT = 60.0
#: How many times a disturbed measurement is made again.
RETRIES = 3
#: The first character of a line of a CrewAI console panel (Rich boxes).
_PANEL_CHARACTERS = frozenset("│╭╰┃┏┗")


class Log:
    """Progress on stderr and in ``run.log``."""

    def __init__(self, path: Path) -> None:
        self.handle: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {message}"
        print(line, file=sys.stderr, flush=True)
        self.handle.write(line + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class Worker:
    """A ``benchmarks.worker`` process: one variant, commands over a pipe."""

    def __init__(
        self,
        variant: str,
        base_url: str,
        env: dict[str, str],
        stderr: IO[str],
        workload: str = common.STANDARD,
        prefix: Sequence[str] = (),
        options: Sequence[str] = (),
    ) -> None:
        self.variant = variant
        self.workload = workload
        self.process = subprocess.Popen(
            [
                *prefix,  # e.g. valgrind and its options
                sys.executable,
                "-m",
                "benchmarks.worker",
                "--variant",
                variant,
                "--base-url",
                base_url,
                "--workload",
                workload,
                *options,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=common.REPO_ROOT,
        )
        self.ready: dict[str, Any] = {}

    def wait_ready(self) -> dict[str, Any]:
        self.ready = self._read()
        return self.ready

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.variant} exited (status {self.process.wait()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.variant}: {reply['error']}")
        return reply

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def request(self, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self._read()

    def run(self, mode: str, concurrency: int, kickoffs: int) -> dict[str, Any]:
        reply = self.request(op="run", mode=mode, concurrency=concurrency, kickoffs=kickoffs)
        if reply.get("errors"):
            raise RuntimeError(
                f"{self.variant}: {reply['errors']} kickoffs failed:\n{reply['first_error']}"
            )
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(RuntimeError, OSError, ValueError):
                self.request(op="exit")
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Bench:
    """Everything one invocation shares: settings, environment, provider, output."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.settings = dataclasses.replace(QUICK if args.quick else FULL, **_overrides(args))
        default_out = "results-quick" if args.quick else "results"
        self.out = Path(args.out) if args.out else common.BENCH_DIR / default_out
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.out / "run.log")
        self.worker_log = open(self.out / "workers.log", "a", encoding="utf-8")  # noqa: SIM115
        self.quick = args.quick
        #: Keep the SDK's export timers in the instructions section (see benchmarks.instructions).
        self.instructions_timers: bool = getattr(args, "instructions_timers", False)
        self.sections = tuple(args.only) if args.only else SECTIONS
        self.variants: list[str] = [common.BASELINE, common.CREW_OTEL]
        if not getattr(args, "no_floor", False):
            self.variants.append(common.SDK_FLOOR)
        self.overlays: dict[str, Path] = {}
        self.skipped: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self.provider: subprocess.Popen[str] | None = None
        self.base_url = ""
        self.system: dict[str, Any] = {}
        self.notes: list[str] = []
        self._tempdirs: list[str] = []
        self.interference = common.Interference()
        self.waited = 0.0
        #: Whether the last measurement saw a quiet machine (then the next needs no check).
        self.was_quiet = False

    def quiet(self, what: str) -> None:
        """Wait for other processes to calm down (within the run's budget)."""
        budget = self.settings.quiet_budget - self.waited
        if budget <= 0 or self.was_quiet:
            return
        waited, cores = self.interference.wait_until_quiet(QUIET, min(MAX_WAIT, budget))
        self.waited += waited
        if waited > 1.5:
            self.log(
                f"waited {waited:.0f} s for other processes before {what} "
                f"(now {cores:.2f} cores busy with them)"
            )

    def measure(
        self, worker: Worker, mode: str, concurrency: int, kickoffs: int, what: str
    ) -> dict[str, Any]:
        """``worker.run`` plus the cores other processes used meanwhile.

        A measurement during which other processes used more than DISTURBED cores is made
        again (after waiting for a quiet machine), up to RETRIES times while the run's
        waiting budget lasts; the discarded attempts are kept in the reply.
        """
        discarded: list[dict[str, Any]] = []
        while True:
            before = self.interference.sample()
            reply = worker.run(mode, concurrency, kickoffs)
            reply["other_cores"] = self.interference.other_cores(before, self.interference.sample())
            self.was_quiet = reply["other_cores"] <= QUIET
            if (
                reply["other_cores"] <= DISTURBED
                or len(discarded) >= RETRIES
                or self.waited >= self.settings.quiet_budget
            ):
                break
            discarded.append(reply)
            self.log(
                f"{what}, {worker.variant}: other processes used "
                f"{reply['other_cores']:.2f} cores; measuring again"
            )
            self.quiet(f"{what} again")
        if discarded:
            reply["discarded_attempts"] = discarded
        return reply

    def _tempdir(self, prefix: str) -> str:
        path = tempfile.mkdtemp(prefix=f"crew-otel-bench-{prefix}")
        self._tempdirs.append(path)
        return path

    # --- set-up ------------------------------------------------------------------------------
    def prepare(self, competitors: bool) -> None:
        tools = deps.ensure_tools()
        self.log("pyperf: " + ("found" if tools is None else "installed in benchmarks/.deps/tools"))
        for name in (common.OPENINFERENCE, common.OPENLLMETRY):
            if not competitors:
                self.skipped[name] = "--no-competitors"
                continue
            try:
                self.overlays[name] = deps.ensure_competitor(name)
                self.variants.append(name)
                self.log(f"{name}: ready ({', '.join(deps.COMPETITORS[name])})")
            except deps.DependencyError as exc:
                self.skipped[name] = str(exc)
                self.log(f"{name}: SKIPPED: {exc}")

        from crew_otel.testing.crews import prepare_offline_environment

        # A temporary HOME etc. (CrewAI writes there), inherited by every child.
        prepare_offline_environment(self._tempdir("home-"))
        if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
            # Imports would compile every module from source in every process; a deployed
            # service has bytecode caches. Keep them in a temporary tree, not the environment.
            os.environ["PYTHONPYCACHEPREFIX"] = self._tempdir("pycache-")
            self.notes.append(
                "the environment set PYTHONDONTWRITEBYTECODE; the benchmark processes cached "
                "bytecode in a temporary PYTHONPYCACHEPREFIX instead"
            )
        self.env = common.overlay_env(dict(os.environ))
        self.provider = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.provider"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.worker_log,
            text=True,
            env=self.env,
            cwd=common.REPO_ROOT,
        )
        assert self.provider.stdout is not None
        self.base_url = self.provider.stdout.readline().strip()
        if not self.base_url:
            raise RuntimeError("the loopback provider did not start")
        self.log(f"loopback provider ready (separate process, pid {self.provider.pid})")
        if common.SDK_FLOOR in self.variants:
            self._capture_floor()

    def _capture_floor(self) -> None:
        """One kickoff's spans and points with crew_otel, for the SDK floor's workers."""
        template = os.path.join(self._tempdir("floor-"), "template.json")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.floor",
                "--capture",
                template,
                "--base-url",
                self.base_url,
            ],
            check=True,
            stdout=self.worker_log,
            stderr=self.worker_log,
            env=self.env,
            cwd=common.REPO_ROOT,
        )
        self.env[common.FLOOR_TEMPLATE_ENV] = template
        self.log("SDK floor: crew_otel's spans and points of one kickoff captured")

    def env_for(self, variant: str) -> dict[str, str]:
        overlay = self.overlays.get(variant)
        return common.overlay_env(self.env, overlay) if overlay else self.env

    def spawn(
        self,
        variants: Sequence[str],
        workload: str = common.STANDARD,
        stderr: IO[str] | None = None,
    ) -> dict[str, Worker]:
        """Start one worker per variant (in parallel) and wait until all are ready."""
        log = stderr if stderr is not None else self.worker_log
        workers = {v: Worker(v, self.base_url, self.env_for(v), log, workload) for v in variants}
        for worker in workers.values():
            worker.wait_ready()
        return workers

    def _keep_stderr(self, path: Path) -> None:
        """Append what workers wrote to ``path`` to workers.log, without CrewAI's console
        panels (box-drawn lines) and blank lines."""
        dropped = 0
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip() or line.lstrip()[:1] in _PANEL_CHARACTERS:
                    dropped += 1
                    continue
                self.worker_log.write(line)
        self.worker_log.write(f"({dropped} lines of CrewAI console panels left out)\n")
        self.worker_log.flush()

    def spawn_pairs(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Worker]:
        """One worker per (workload, variant), started in parallel; wait until all are ready."""
        workers = {
            (workload, variant): Worker(
                variant, self.base_url, self.env_for(variant), self.worker_log, workload
            )
            for workload, variant in pairs
        }
        for worker in workers.values():
            worker.wait_ready()
        return workers

    def close(self) -> None:
        if self.provider is not None and self.provider.poll() is None:
            assert self.provider.stdin is not None
            self.provider.stdin.close()
            try:
                self.provider.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.provider.kill()
        self.worker_log.close()
        for path in self._tempdirs:
            shutil.rmtree(path, ignore_errors=True)

    def write(self, name: str, data: Any) -> Path:
        path = self.out / name
        path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        return path

    # --- 5. start-up -------------------------------------------------------------------------
    def startup(self) -> dict[str, Any]:
        plan = [(common.CREW_OTEL, self.settings.startup_probes)]
        plan += [
            (v, self.settings.competitor_startup_probes)
            for v in self.variants
            if v not in (common.BASELINE, common.CREW_OTEL)
        ]
        probes: dict[str, list[dict[str, Any]]] = {}
        for variant, count in plan:
            if count <= 0:
                continue
            # One unmeasured process first (bytecode caches), and for crew_otel one under
            # cProfile; then the measured ones.
            kinds = ["warm-up"] + (["profiled"] if variant == common.CREW_OTEL else [])
            queue = [*kinds, *["measured"] * count]
            retries = 0
            while queue:
                kind = queue.pop(0)
                if kind == "measured":
                    self.quiet(f"a start-up probe of {variant}")
                before = self.interference.sample()
                command = [sys.executable, "-m", "benchmarks.startup", "--variant", variant]
                if kind == "profiled":
                    command += ["--profile", str(self.out / "startup-profile.txt")]
                output = self._run_module(command, "start-up probe", self.env_for(variant))
                probe = json.loads(output.strip().splitlines()[-1])
                probe["kind"] = kind
                probe["other_cores"] = self.interference.other_cores(
                    before, self.interference.sample()
                )
                if (
                    kind == "measured"
                    and probe["other_cores"] > DISTURBED
                    and retries < RETRIES * count
                    and self.waited < self.settings.quiet_budget
                ):
                    probe["kind"] = "disturbed"
                    retries += 1
                    queue.append("measured")
                probes.setdefault(variant, []).append(probe)
            self.log(f"start-up: {count} measured fresh processes of {variant}")
        imports = []
        for _ in range(self.settings.import_probes):
            self.quiet("an `import crew_otel` probe")
            before = self.interference.sample()
            output = self._run_module(
                [sys.executable, "-m", "benchmarks.startup", "--imports"], "import probe"
            )
            probe = json.loads(output.strip().splitlines()[-1])
            probe["other_cores"] = self.interference.other_cores(before, self.interference.sample())
            imports.append(probe)
        self.log(f"start-up: {len(imports)} fresh processes that only import crew_otel")
        result = {"probes": probes, "imports": imports}
        self.write("startup.json", result)
        return result

    # --- 1. per-hook cost --------------------------------------------------------------------
    def hooks(self) -> dict[str, Any]:
        settings = self.settings
        path = self._microbenchmarks(
            "hooks", "per-hook", settings.hooks_processes, settings.hooks_values
        )
        self.log(f"per-hook microbenchmarks done ({path.name})")
        self._cold_hooks()
        return report.load_hooks(path)

    def _cold_hooks(self) -> None:
        """The same benchmarks called one at a time with cold caches, beside hot
        (``benchmarks.hooks --cold``, into ``hooks-cold.json``)."""
        from benchmarks import hooks

        path = self.out / "hooks-cold.json"
        calls = 20 if self.quick else hooks.COLD_CALLS
        self.quiet("the cold per-hook calls")
        self._run_module(
            [sys.executable, "-m", "benchmarks.hooks", "--cold", str(path), "--calls", str(calls)],
            "cold per-hook calls",
        )
        self.log(f"cold per-hook calls done ({calls} per benchmark)")

    def _run_module(self, command: list[str], what: str, env: dict[str, str] | None = None) -> str:
        """Run a benchmark's process to its end (in ``env``, else the run's environment), its
        output into the workers' log; its standard output, or an error with the end of its
        standard error if it failed."""
        completed = subprocess.run(
            command,
            env=self.env if env is None else env,
            cwd=common.REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        self.worker_log.write(completed.stdout + completed.stderr)
        if completed.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{completed.stderr[-3000:]}")
        return completed.stdout

    def _microbenchmarks(self, module: str, what: str, processes: int, values: int) -> Path:
        """Run ``benchmarks.<module>`` under pyperf (``--smoke`` in a quick run) into
        ``<module>.json`` (``<module>-smoke.json``), again once if other processes disturbed
        it; the cores they used go to ``<module>-interference.json``."""
        if self.settings.hooks_pyperf:
            path = self.out / f"{module}.json"
            path.unlink(missing_ok=True)
            command = [
                sys.executable,
                "-m",
                f"benchmarks.{module}",
                "-o",
                str(path),
                "--processes",
                str(processes),
                "--values",
                str(values),
                "--copy-env",
                "--quiet",
            ]
        else:
            path = self.out / f"{module}-smoke.json"
            command = [sys.executable, "-m", f"benchmarks.{module}", "--smoke", "-o", str(path)]
        attempts: list[float] = []
        while True:
            self.quiet(f"the {what} benchmarks")
            if self.settings.hooks_pyperf:
                path.unlink(missing_ok=True)
            before = self.interference.sample()
            self._run_module(command, f"{what} benchmark")
            other = self.interference.other_cores(before, self.interference.sample())
            attempts.append(other)
            if other <= DISTURBED or len(attempts) > 1 or self.waited >= self.settings.quiet_budget:
                break
            self.log(f"{what} benchmarks: other processes used {other:.2f} cores; again")
        self.write(f"{module}-interference.json", {"other_cores": other, "attempts": attempts})
        self.log(f"{what} benchmarks: other processes used {other:.2f} cores meanwhile")
        return path

    def variants_with_floor_in_place(self) -> list[str]:
        """The variants, with the SDK floor in place beside the burst one (the same spans and
        points made where the run makes them), for the sections that measure a kickoff's cost
        (end to end, instructions)."""
        variants = list(self.variants)
        if common.SDK_FLOOR in variants:
            variants.insert(variants.index(common.SDK_FLOOR) + 1, common.SDK_FLOOR_IN_PLACE)
        return variants

    # --- 2.-4. end-to-end, concurrency, profile -------------------------------------------------
    def e2e(self) -> dict[str, Any]:
        s = self.settings
        variants = self.variants_with_floor_in_place()
        rounds: list[dict[str, Any]] = []
        ready: dict[str, list[dict[str, Any]]] = {}
        concurrency: list[dict[str, Any]] = []
        profile: dict[str, Any] = {}
        spans: dict[str, Any] = {}
        for block in range(s.e2e_blocks):
            workers = self.spawn(variants)
            try:
                for variant, worker in workers.items():
                    ready.setdefault(variant, []).append(worker.ready)
                for worker in workers.values():
                    worker.run("threads", 1, s.warmup_kickoffs)
                self.log(f"e2e block {block + 1}/{s.e2e_blocks}: {len(workers)} workers warm")
                for index in range(s.e2e_rounds):
                    order = _rotation(variants, index, reverse=block % 2 == 1)
                    self.quiet(f"e2e round {index + 1}")
                    for variant in order:
                        reply = self.measure(
                            workers[variant], "threads", 1, s.e2e_kickoffs, f"e2e round {index + 1}"
                        )
                        rounds.append({"block": block, "round": index, "variant": variant, **reply})
                    if (index + 1) % 5 == 0 or index + 1 == s.e2e_rounds:
                        self.log(f"e2e block {block + 1} round {index + 1}/{s.e2e_rounds}")
                if block == s.e2e_blocks - 1:
                    concurrency = self._concurrency(workers)
                    profile = self._profile(workers[common.CREW_OTEL])
                for variant, worker in workers.items():
                    counts = worker.request(op="spans")
                    spans.setdefault(variant, []).append(counts)
            finally:
                for worker in workers.values():
                    worker.close()
        raw = {
            "settings": {
                "blocks": s.e2e_blocks,
                "rounds_per_block": s.e2e_rounds,
                "kickoffs_per_round": s.e2e_kickoffs,
                "warmup_kickoffs": s.warmup_kickoffs,
            },
            "workers": ready,
            "rounds": rounds,
            "span_names": spans,
        }
        self.write("e2e-raw.json", raw)
        self.write("concurrency.json", {"levels": s.concurrency_levels, "runs": concurrency})
        self._pyperf_files(rounds)
        return {"raw": raw, "concurrency": concurrency, "profile": profile}

    def _concurrency(self, workers: dict[str, Worker]) -> list[dict[str, Any]]:
        s = self.settings
        pair = [common.BASELINE, common.CREW_OTEL]
        runs = []
        if s.concurrency_warmup:  # once per level, unmeasured
            for _label, mode, level, _kickoffs in s.concurrency_levels:
                for variant in pair:
                    workers[variant].run(mode, level, level)
        for index in range(s.concurrency_rounds):
            for label, mode, level, kickoffs in s.concurrency_levels:
                self.quiet(f"concurrency round {index + 1} ({label})")
                for variant in _rotation(pair, index):
                    reply = self.measure(
                        workers[variant], mode, level, kickoffs, f"concurrency {label}"
                    )
                    runs.append(
                        {
                            "round": index,
                            "level": label,
                            "mode": mode,
                            "concurrency": level,
                            "variant": variant,
                            **reply,
                        }
                    )
            self.log(f"concurrency round {index + 1}/{s.concurrency_rounds}")
        return runs

    def _profile(self, worker: Worker) -> dict[str, Any]:
        reply = worker.request(
            op="profile", kickoffs=self.settings.profile_kickoffs, out=str(self.out / "profile.txt")
        )
        self.write("profile.json", reply)
        self.log("profile written (profile.txt)")
        return reply

    def _pyperf_files(self, rounds: list[dict[str, Any]]) -> None:
        """One pyperf file per variant (values = per-round means), and pyperf's comparison."""
        import pyperf

        paths = []
        for variant in self.variants:
            benchmarks = []
            for metric in ("cpu", "wall"):
                runs = []
                for block in sorted({r["block"] for r in rounds}):
                    values = [
                        r[metric] for r in rounds if r["variant"] == variant and r["block"] == block
                    ]
                    if not values:
                        continue
                    metadata = {
                        "name": f"e2e {metric} per kickoff",
                        "unit": "second",
                        "loops": self.settings.e2e_kickoffs,
                        "description": f"{common.LABELS[variant]}: research_crew kickoff",
                    }
                    runs.append(pyperf.Run(values, metadata=metadata, collect_metadata=False))
                if runs:
                    benchmarks.append(pyperf.Benchmark(runs))
            path = self.out / f"e2e-{variant}.json"
            path.unlink(missing_ok=True)
            pyperf.BenchmarkSuite(benchmarks).dump(str(path))
            paths.append(str(path))
        if len(paths) > 1 and len(rounds) >= 2 * len(paths):
            completed = subprocess.run(
                [sys.executable, "-m", "pyperf", "compare_to", *paths],
                capture_output=True,
                text=True,
                env=self.env,
                cwd=common.REPO_ROOT,
                check=False,
            )
            (self.out / "e2e-compare.txt").write_text(
                completed.stdout + completed.stderr, encoding="utf-8"
            )

    # --- 7. Flow + memory ------------------------------------------------------------------------
    def flow_memory(self) -> dict[str, Any]:
        """The Flow + memory workload (a Flow whose listen step kicks off a crew with
        ``memory=True`` and a knowledge source), uninstrumented vs crew_otel, interleaved like
        the end-to-end section: rotating order, fresh processes per block (the second block in
        reverse order), warm-up kickoffs first."""
        s = self.settings
        pair = [common.BASELINE, common.CREW_OTEL]
        rounds: list[dict[str, Any]] = []
        ready: dict[str, list[dict[str, Any]]] = {}
        spans: dict[str, Any] = {}
        for block in range(s.flow_blocks):
            # CrewAI prints Flow panels on every kickoff: keep them out of workers.log.
            panels = Path(self._tempdir("flow-stderr-")) / "stderr.log"
            stderr = open(panels, "w", encoding="utf-8")  # noqa: SIM115
            workers = self.spawn(pair, common.FLOW_MEMORY, stderr)
            try:
                for variant, worker in workers.items():
                    ready.setdefault(variant, []).append(worker.ready)
                for worker in workers.values():
                    worker.run("threads", 1, s.flow_warmup)
                self.log(f"flow-memory block {block + 1}/{s.flow_blocks}: workers warm")
                for index in range(s.flow_rounds):
                    self.quiet(f"flow-memory round {index + 1}")
                    for variant in _rotation(pair, index, reverse=block % 2 == 1):
                        reply = self.measure(
                            workers[variant],
                            "threads",
                            1,
                            s.flow_kickoffs,
                            f"flow-memory round {index + 1}",
                        )
                        rounds.append({"block": block, "round": index, "variant": variant, **reply})
                    if (index + 1) % 5 == 0 or index + 1 == s.flow_rounds:
                        self.log(f"flow-memory block {block + 1} round {index + 1}/{s.flow_rounds}")
                for variant, worker in workers.items():
                    spans.setdefault(variant, []).append(worker.request(op="spans"))
            finally:
                for worker in workers.values():
                    worker.close()
                stderr.close()
                self._keep_stderr(panels)
        raw = {
            "settings": {
                "blocks": s.flow_blocks,
                "rounds_per_block": s.flow_rounds,
                "kickoffs_per_round": s.flow_kickoffs,
                "warmup_kickoffs": s.flow_warmup,
            },
            "workers": ready,
            "rounds": rounds,
            "span_names": spans,
        }
        self.write("flow-memory-raw.json", raw)
        return raw

    # --- 6. shared-state detectors -------------------------------------------------------------
    def shared_state(self) -> dict[str, Any]:
        """crew_otel with the shared-state detectors on vs off, end to end (the standard
        workload and one whose tool does file and SQLite I/O), then their cost outside runs."""
        s = self.settings
        pair = [common.CREW_OTEL, common.CREW_OTEL_NO_DETECT]
        pairs = [(workload, variant) for workload in common.WORKLOADS for variant in pair]
        rounds: list[dict[str, Any]] = []
        ready: list[dict[str, Any]] = []
        profile: dict[str, Any] = {}
        for block in range(s.shared_blocks):
            workers = self.spawn_pairs(pairs)
            try:
                for (workload, _variant), worker in workers.items():
                    ready.append({"block": block, "workload": workload, **worker.ready})
                for worker in workers.values():
                    worker.run("threads", 1, s.warmup_kickoffs)
                self.log(f"shared-state block {block + 1}/{s.shared_blocks}: workers warm")
                for index in range(s.shared_rounds):
                    self.quiet(f"shared-state round {index + 1}")
                    workloads = _rotation(common.WORKLOADS, index, reverse=block % 2 == 1)
                    for position, workload in enumerate(workloads):
                        # The two variants of a workload back to back, each first equally often.
                        for variant in _rotation(pair, index + position + block):
                            reply = self.measure(
                                workers[(workload, variant)],
                                "threads",
                                1,
                                s.shared_kickoffs,
                                f"shared-state round {index + 1} ({workload})",
                            )
                            rounds.append(
                                {
                                    "block": block,
                                    "round": index,
                                    "workload": workload,
                                    "variant": variant,
                                    **reply,
                                }
                            )
                    if (index + 1) % 5 == 0 or index + 1 == s.shared_rounds:
                        self.log(f"shared-state block {block + 1} round {index + 1}")
                if block == s.shared_blocks - 1:
                    profiled = workers[(common.IO, common.CREW_OTEL)]
                    profile = profiled.request(
                        op="profile",
                        kickoffs=s.profile_kickoffs,
                        out=str(self.out / "shared-state-profile.txt"),
                    )
            finally:
                for worker in workers.values():
                    worker.close()
        raw = {
            "settings": {
                "blocks": s.shared_blocks,
                "rounds_per_block": s.shared_rounds,
                "kickoffs_per_round": s.shared_kickoffs,
                "warmup_kickoffs": s.warmup_kickoffs,
            },
            "workers": ready,
            "rounds": rounds,
            "profile": profile,
        }
        self.write("shared-state-raw.json", raw)
        path = self._microbenchmarks(
            "detectors", "shared-state detectors", s.detectors_processes, s.detectors_values
        )
        self.log(f"shared-state detectors done ({path.name})")
        return raw

    # --- 4. memory soak ----------------------------------------------------------------------
    def soak(self) -> dict[str, Any]:
        kickoffs = self.settings.soak_kickoffs
        every = max(kickoffs // 10, 1)
        # The SDK floor beside them: what exporting crew_otel's spans and points alone does to
        # RSS, so that crew_otel's own part of any growth shows.
        pair = [common.BASELINE, common.CREW_OTEL]
        if common.SDK_FLOOR in self.variants:
            pair.append(common.SDK_FLOOR)
        workers = self.spawn(pair)
        started = time.perf_counter()
        try:
            for worker in workers.values():
                worker.run("threads", 1, self.settings.soak_warmup)
            self.quiet("the soak")
            before = self.interference.sample()
            for worker in workers.values():  # all at once
                worker.send(op="soak", kickoffs=kickoffs, every=every)
            results = {variant: workers[variant]._read() for variant in pair}
            other = self.interference.other_cores(before, self.interference.sample())
        finally:
            for worker in workers.values():
                worker.close()
        elapsed = time.perf_counter() - started
        for variant, result in results.items():
            if result.get("errors"):
                raise RuntimeError(f"soak {variant}: {result['errors']} kickoffs failed")
        data = {
            "kickoffs": kickoffs,
            "every": every,
            "elapsed_s": elapsed,
            "warmup_kickoffs": self.settings.soak_warmup,
            "other_cores": other,
            "note": "the variants ran at the same time, one process each; sample 0 is after "
            "the warm-up kickoffs",
            "variants": results,
        }
        self.write(f"soak-{kickoffs}.json", data)
        self.log(f"soak: {kickoffs} kickoffs per variant in {elapsed:.0f} s")
        return data

    # --- 8. `crew-otel report` on a big trace file -----------------------------------------
    def report(self) -> dict[str, Any]:
        from benchmarks import trace_report

        sizes = trace_report.QUICK_SIZES_MB if self.quick else trace_report.DEFAULT_SIZES_MB
        self.quiet("the report benchmark")
        data = trace_report.run(sizes, self.out)
        for line in trace_report.describe(data).splitlines():
            self.log(f"report: {line}")
        return data

    # --- 9. executed instructions (callgrind) -------------------------------------------------
    def instructions(self) -> dict[str, Any]:
        from benchmarks import instructions

        if shutil.which("valgrind") is None:
            self.skipped["instructions"] = (
                "valgrind is not installed (Debian/Ubuntu: `apt-get install valgrind`)"
            )
            self.log(f"instructions: {self.skipped['instructions']}; skipped")
            return {}
        return instructions.measure(self)


def _previous_system(directory: Path) -> dict[str, Any] | None:
    path = directory / "system.json"
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _rotation(items: Sequence[str], index: int, reverse: bool = False) -> list[str]:
    """A different order each round (each variant runs first equally often)."""
    ordered = list(reversed(items)) if reverse else list(items)
    shift = index % len(ordered)
    return ordered[shift:] + ordered[:shift]


#: Options that override the settings field of the same name (``--e2e-rounds N``: ``e2e_rounds``).
SETTING_OPTIONS = (
    "soak_kickoffs",
    "shared_rounds",
    "e2e_rounds",
    "flow_rounds",
    "instructions_windows",
    "instructions_processes",
)
#: Flags that change what a run measures (named in its recorded command with the options).
FLAG_OPTIONS = ("no_competitors", "no_floor", "instructions_timers")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings fields the command line sets (a list of values becomes a tuple)."""
    found = {name: getattr(args, name, None) for name in SETTING_OPTIONS}
    return {
        name: tuple(value) if isinstance(value, list) else value
        for name, value in found.items()
        if value
    }


def _command_options(args: argparse.Namespace) -> str:
    """The options and flags given, as they were written (for the run's recorded command)."""
    parts = [
        f"--{name.replace('_', '-')} "
        + (" ".join(map(str, value)) if isinstance(value, tuple) else str(value))
        for name, value in _overrides(args).items()
    ]
    parts += [f"--{name.replace('_', '-')}" for name in FLAG_OPTIONS if getattr(args, name, False)]
    return "".join(f" {part}" for part in parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke run, a few minutes")
    parser.add_argument("--out", help="results directory (default benchmarks/results[-quick])")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--soak-kickoffs", type=int, help="kickoffs per variant in the memory soak")
    parser.add_argument(
        "--shared-rounds", type=int, help="rounds per block in the shared-state section"
    )
    parser.add_argument("--e2e-rounds", type=int, help="rounds per block in the e2e section")
    parser.add_argument(
        "--flow-rounds", type=int, help="rounds per block in the flow-memory section"
    )
    parser.add_argument(
        "--instructions-windows",
        type=int,
        nargs="+",
        help="instructions section: kickoffs per measured window (default 3 12)",
    )
    parser.add_argument(
        "--instructions-processes",
        type=int,
        help="instructions section: callgrind processes per variant, the median reported "
        "(default 1)",
    )
    parser.add_argument(
        "--no-competitors", action="store_true", help="skip OpenInference and OpenLLMetry"
    )
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the SDK floor (crew_otel's spans and points made by the bare SDK)",
    )
    parser.add_argument(
        "--instructions-timers",
        action="store_true",
        help="instructions section: keep the SDK's span and metric export timers",
    )
    args = parser.parse_args(argv)

    bench = Bench(args)
    started = time.perf_counter()
    cpu_at_start = common.machine_cpu()
    results: dict[str, Any] = {}
    try:
        bench.prepare(competitors=not args.no_competitors)
        for section in SECTIONS:
            if section in bench.sections:
                bench.log(f"--- {section}")
                bench.was_quiet = False
                results[section] = getattr(bench, section.replace("-", "_"))()
    finally:
        bench.close()
    load = common.machine_load(cpu_at_start, common.machine_cpu())
    system = {
        **common.system_info(),
        "command": "python -m benchmarks.run" + (" --quick" if args.quick else ""),
        "sections": list(bench.sections),
        "settings": dataclasses.asdict(bench.settings),
        "runtime_s": round(time.perf_counter() - started, 1),
        "versions": common.versions(),
        "competitors": {
            name: {"packages": list(deps.COMPETITORS[name]), "installed": name in bench.overlays}
            for name in deps.COMPETITORS
        },
        "skipped": bench.skipped,
        "machine_load": load,
        "waited_for_quiet_s": round(bench.waited, 1),
        "quiet_threshold_cores": QUIET,
        "disturbed_threshold_cores": DISTURBED,
        "notes": bench.notes,
    }
    previous = _previous_system(bench.out) if args.only else None
    if previous is not None:
        # A partial run adds to the results of a full one instead of replacing its record.
        previous.setdefault("additional_runs", []).append(
            {
                key: system[key]
                for key in (
                    "date",
                    "command",
                    "sections",
                    "settings",
                    "runtime_s",
                    "skipped",
                    "machine_load",
                    "notes",
                )
            }
        )
        previous["additional_runs"][-1]["command"] += (
            " --only " + " ".join(args.only) + _command_options(args)
        )
        system = previous
    bench.write("system.json", system)
    table = report.render(bench.out, system)
    (bench.out / "summary.md").write_text(table, encoding="utf-8")
    common.scrub_tree(bench.out)
    print(common.scrub(table))
    bench.log(f"done in {time.perf_counter() - started:.0f} s; results in {bench.out.name}/")
    bench.log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
