"""`python -m mmsoup <command>`: one function per command, registered in COMMANDS.

To add a command, write a function taking the parsed arguments and decorate it:

    @command("data", "build and verify the digits benchmark", arg("--cache", type=Path))
    def cmd_data(args: argparse.Namespace) -> int | None: ...

A user-caused problem (MMSoupError, and a wrong flag) prints one line `mmsoup: error: <message>`
and exits 2; an interrupt exits 1. `--debug` (before or after the command) shows the traceback
instead. Every command checks all of its inputs (flags, profile, configs, input files, output
folders) before it starts any work, and logs each long step (pretraining included) on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsoup.errors import MMSoupError, Parser
from mmsoup.io import cache_root, check_free_space, check_readable, check_writable
from mmsoup.progress import end_bars, pretrain_lines

Handler = Callable[[argparse.Namespace], "int | None"]


@dataclass(frozen=True)
class Command:
    """A registered subcommand: its help line, its arguments and the function that runs it."""

    help: str
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
    handler: Handler


COMMANDS: dict[str, Command] = {}


def arg(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One argument of a command, as for `ArgumentParser.add_argument(*flags, **kwargs)`."""
    return flags, kwargs


def command(
    name: str, help: str, *arguments: tuple[tuple[str, ...], dict[str, Any]]
) -> Callable[[Handler], Handler]:
    """Register the decorated function as subcommand `name` with the given arguments."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(help, arguments, handler)
        return handler

    return register


def integer(low: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= `low`; anything else is one sentence naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {low}{why}")
        return value

    return parse


PROFILE = arg(
    "--profile",
    default="embedded",
    help="named profile, optionally with overrides: NAME[:FIELD=INT,...] (default: embedded)",
)
CACHE = arg(
    "--cache",
    type=Path,
    default=None,
    help="cache root (default: $MMSOUP_CACHE or ~/.cache/mmsoup)",
)
# One meaning per flag: --run-dir is the run folder the stages share (sweep/, soups/, results/,
# notebooks/); --out is what a command itself produces (a checkpoint, or figures and tables).
RUN_DIR = arg("--run-dir", type=Path, default=None, help="run folder (default: runs/<profile>)")
THREADS = arg(
    "--threads",
    type=integer(1),
    default=None,
    help="torch threads per process (default: the profile's)",
)


def _log(message: str) -> None:
    """A progress line on stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def check_cache(args: argparse.Namespace) -> Path:
    """Refuse a cache folder the command could not write its backbone or data into."""
    cache = getattr(args, "cache", None)
    flag = "--cache" if cache else "the cache folder ($MMSOUP_CACHE)"
    return check_writable(cache_root(cache), flag)


@command(
    "pretrain",
    "copy the released embedded backbone (or pretrain it) and fit its linear probe (cached)",
    PROFILE,
    CACHE,
    THREADS,
    arg(
        "--recreate",
        action="store_true",
        help="pretrain the backbone again from scratch instead of using the released file",
    ),
)
def cmd_pretrain(args: argparse.Namespace) -> None:
    """Build (or find cached) the backbone and the LP init of a profile."""
    from mmsoup.profiles import get_profile

    get_profile(args.profile)  # a wrong name fails before torch is imported
    check_cache(args)
    from mmsoup.checkpoints import read_sidecar
    from mmsoup.pretrain import prepare

    backbone, lp = prepare(
        args.profile,
        cache_dir=args.cache,
        threads=args.threads,
        on_step=pretrain_lines,
        force=args.recreate,
    )
    b, p = read_sidecar(backbone), read_sidecar(lp)
    print(f"backbone  {backbone}  fresh renders {b['fresh_acc']:.2%}")
    print(f"LP init   {lp}  held-out {p['val_acc']:.2%}  test {p['test_acc']:.2%}  C={p['C']:g}")


@command(
    "finetune",
    "run one fine-tuning run: run K of a sweep file, or one config",
    arg("--sweep", type=Path, help="sweep file (sweep.json) whose run K to execute"),
    arg(
        "--run",
        type=integer(1),
        default=os.environ.get("SLURM_ARRAY_TASK_ID"),  # `sbatch --array=1-12` fans a sweep out
        help="run number K (1..n; writes model_K.safetensors; default: $SLURM_ARRAY_TASK_ID)",
    ),
    arg("--force", action="store_true", help="redo run K even if it already finished"),
    arg("--config", help="a run config as a JSON file or inline JSON (instead of --sweep)"),
    arg("--init", type=Path, help="LP init checkpoint for --config (default: the profile's)"),
    arg(
        "--out",
        type=Path,
        help="checkpoint to write for --config (default: runs/finetune/run-<hash>.safetensors)",
    ),
    PROFILE,
    CACHE,
    THREADS,
)
def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune once and print the checkpoint and its held-out accuracy."""
    from mmsoup.profiles import get_profile

    get_profile(args.profile)

    def on_step(step: int, total: int, loss: float) -> None:
        if step == 0 or (step + 1) % 50 == 0 or step == total - 1:
            _log(f"step {step + 1}/{total} loss {loss:.3f}")

    if args.sweep is not None:
        if args.run is None or args.config is not None:
            raise MMSoupError(
                "--sweep needs --run K (and no --config); e.g. --sweep runs/embedded/sweep/sweep.json --run 1."
            )
        if args.init is not None or args.out is not None:
            raise MMSoupError(
                "--init and --out go with --config only; a --sweep run starts from the sweep's "
                "model_0 and writes model_K beside its sweep file."
            )
        from mmsoup.sweep import load_sweep, run_from_sweep

        sweep = load_sweep(args.sweep)  # a missing or malformed file, or a bad config in it
        out = sweep.checkpoint(args.run)  # --run out of range
        check_writable(sweep.out, "The folder of --sweep")
        if sweep.cache_dir is not None:
            check_writable(sweep.cache_dir, f"The cache folder of {args.sweep}")
        else:
            check_cache(args)
        meta = run_from_sweep(
            args.sweep, args.run, threads=args.threads, on_step=on_step, force=args.force
        )
    elif args.config is not None:
        from mmsoup.finetune import FinetuneConfig

        config = FinetuneConfig.from_json(_json_argument(args.config, "--config"), "--config")
        if args.init is not None:
            check_readable(args.init, "--init")
        elif config.arch != get_profile(args.profile).arch:
            raise MMSoupError(
                f"--config arch={config.arch!r} differs from the {get_profile(args.profile).arch!r} "
                f"backbone of profile {args.profile!r}; pass --init with a checkpoint of that arch."
            )
        out = args.out or Path("runs") / "finetune" / f"run-{config.key()}.safetensors"
        check_writable(out, "--out", file=True)
        check_cache(args)
        from mmsoup.finetune import run_finetune
        from mmsoup.pretrain import prepare

        init = args.init
        if init is None:
            init = prepare(
                args.profile, cache_dir=args.cache, threads=args.threads, on_step=pretrain_lines
            )[1]
        check_free_space(out.parent, Path(init).stat().st_size, "--out")
        meta = run_finetune(config, init, out, args.cache, _threads(args), on_step=on_step)
    else:
        raise MMSoupError("finetune needs --sweep FILE --run K, or --config JSON.")
    print(f"{out}  val_acc {meta['val_acc']:.2%}")  # no clock: sweep logs are committed results


@command(
    "sweep",
    "pretrain if needed, then run (or resume) the fine-tuning sweep of a profile into <run-dir>/sweep",
    PROFILE,
    RUN_DIR,
    arg("--jobs", type=integer(1), default=None, help="concurrent runs (default: the profile's)"),
    arg(
        "--configs",
        type=Path,
        help="JSON list of run configs to sweep instead of the profile's search",
    ),
    CACHE,
    THREADS,
)
def cmd_sweep(args: argparse.Namespace) -> None:
    """Write the sweep file of a profile and run its unfinished runs."""
    from mmsoup.profiles import get_profile

    prof = get_profile(args.profile)  # a wrong name fails before torch is imported
    run_dir = check_writable(args.run_dir or Path("runs") / args.profile, "--run-dir")
    out = run_dir / "sweep"  # where `soup`, `evaluate` and the notebooks look for the models
    if args.configs is not None:
        check_readable(args.configs, "--configs")
    check_cache(args)
    from mmsoup.pretrain import prepare
    from mmsoup.sweep import (
        check_sweep_folder,
        load_configs,
        profile_configs,
        run_sweep,
        summary,
        write_sweep,
    )

    configs = load_configs(args.configs) if args.configs else profile_configs(args.profile)
    check_sweep_folder(configs, out)  # another sweep already there: refused before pretraining
    _, lp = prepare(
        args.profile, cache_dir=args.cache, threads=args.threads, on_step=pretrain_lines
    )
    check_free_space(out, (len(configs) + 1) * Path(lp).stat().st_size, "--run-dir")
    sweep_file = write_sweep(configs, out, lp, profile=args.profile, cache_dir=args.cache)
    report = run_sweep(sweep_file, jobs=args.jobs or prof.jobs, threads=args.threads)
    _log(
        f"sweep {sweep_file}: ran {len(report.ran)}, already done {len(report.skipped)}, {report.seconds:.0f} s"
    )
    for row in summary(sweep_file, timings=True):
        aug = (
            row["augment"]
            if row["augment"] == "minimal"
            else f"RA(M={row['randaug_m']},N={row['randaug_n']})"
        )
        print(
            f"{row['name']:>9}  lr {row['lr']:.1e}  wd {row['weight_decay']:.1e}  ep {row['epochs']}  "
            f"ls {row['label_smoothing']:.2f}  mixup {row['mixup_alpha']:.2f}  {aug:<14}  "
            f"val_acc {row['val_acc']:.2%}"
            + ("" if row["wall_seconds"] is None else f"  {row['wall_seconds']:.0f} s")
        )


def _threads(args: argparse.Namespace) -> int | None:
    """--threads, else the thread count of --profile."""
    from mmsoup.profiles import get_profile

    return args.threads if args.threads is not None else get_profile(args.profile).threads


def _json_argument(value: str, flag: str) -> dict[str, Any]:
    """A JSON object given inline or as a file path (which must exist and be readable)."""
    path = Path(value).expanduser()
    if path.is_file():
        text = check_readable(path, flag).read_text()
    elif value.lstrip().startswith(("{", "[")) or not value.endswith(".json"):
        text = value
    else:
        raise MMSoupError(
            f"{flag} file {value} does not exist; check the path or pass inline JSON."
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise MMSoupError(
            f"{flag} {value!r} is neither an existing file nor valid inline JSON; pass e.g. '{{\"lr\": 0.001}}'."
        ) from None
    if not isinstance(data, dict):
        raise MMSoupError(
            f"{flag} must be a JSON object of hyper-parameters, e.g. '{{\"lr\": 0.001}}'."
        )
    return data


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per registered command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    parser = Parser(
        prog="mmsoup",
        description="Model soups and manifold mixing model soups, reproducible on a laptop.",
        parents=[common],
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        sub = subparsers.add_parser(name, help=cmd.help, description=cmd.help, parents=[common])
        for flags, kwargs in cmd.arguments:
            sub.add_argument(*flags, **kwargs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mmsoup` and `python -m mmsoup`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    words = [a for a in argv if a != "--debug"]
    try:
        if words[:1] == ["distributed"]:  # its flags are its own (REMAINDER refuses a leading flag)
            args = argparse.Namespace(command="distributed", rest=words[1:])
        else:
            args = build_parser().parse_args(argv)
            debug = getattr(args, "debug", False)
        status = COMMANDS[args.command].handler(args)
    except MMSoupError as e:
        if debug:
            raise
        end_bars()  # the error on a line of its own, not after a live bar
        print(f"mmsoup: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if debug:
            raise
        end_bars()
        print(f"mmsoup: error: interrupted{f' {e}' if str(e) else ''}", file=sys.stderr)
        return 1
    return int(status or 0)


DATA_ACTIONS = ("build", "verify", "fetch")


@command(
    "data",
    "build the embedded benchmark, verify a profile's data, or fetch public artifacts",
    arg("action", choices=DATA_ACTIONS, help="build | verify | fetch"),
    arg("names", nargs="*", metavar="NAME", help="artifacts to fetch (glob patterns allowed)"),
    PROFILE,
    arg("--data-root", default=None, help="paper data root (default: $MMSOUP_DATA)"),
    arg("--quiet", action="store_true", help="no progress bars"),
)
def cmd_data(args: argparse.Namespace) -> int | None:
    """`data build` (digits), `data verify --profile P`, `data fetch NAME...` (data_manifest.csv)."""
    from mmsoup.profiles import dataset_of, get_profile

    get_profile(args.profile)
    if args.action == "build":
        check_cache(args)  # the digits benchmark, whatever --profile says
        from mmsoup.data import digits

        for name, path in digits.build_all(progress=not args.quiet).items():
            images, _ = digits.load(name)
            print(f"{name:>16}  {len(images):>5} images  sha256 ok  {path}")
        return 0
    if args.action == "verify":
        if dataset_of(args.profile).in_cache:  # built sets (the digits): in the cache, by digest
            args.data_root = args.data_root or str(cache_root())
        return cmd_data_verify(args)
    from mmsoup.data.manifest import data_root

    flag = "--data-root" if args.data_root else "the data folder ($MMSOUP_DATA)"
    check_writable(data_root(args.data_root), flag)
    return cmd_data_fetch(args)


def cmd_data_verify(args: argparse.Namespace) -> int:
    """`mmsoup data verify --profile P [--data-root DIR]`: print the table; 1 if anything is not present."""
    from mmsoup.data.manifest import PRESENT, format_report, verify

    table = verify(getattr(args, "profile", "paper"), getattr(args, "data_root", None))
    print(format_report(table))
    return 0 if (table["status"] == PRESENT).all() else 1


def cmd_data_fetch(args: argparse.Namespace) -> int:
    """`mmsoup data fetch NAME... [--data-root DIR] [--quiet]`: download what is public."""
    if not getattr(args, "names", None):
        raise MMSoupError("Name what to fetch, e.g. `mmsoup data fetch model_0` or `model_*`.")
    from mmsoup.data.manifest import fetch

    for path in fetch(
        args.names, getattr(args, "data_root", None), not getattr(args, "quiet", False)
    ):
        print(f"present {path}")
    return 0


@command(
    "soup",
    "build the soups of a run folder on its held-out split (uniform, greedy, MMS, learned, ...)",
    PROFILE,
    RUN_DIR,
    arg(
        "--recipe", action="append", default=None, help="a recipe name, e.g. 'MMS-C8' (repeatable)"
    ),
    arg("--config", help="soup your own checkpoints: a YAML config (see README)"),
    arg("--out", type=Path, default=None, help="with --config: output folder (overrides out:)"),
    arg("--shard-size", default=None, help="with --config: write shards of this size, e.g. 2GB"),
    arg("--device", default=None, help="with --config: torch device (overrides device:)"),
    arg(
        "--trust-code",
        action="store_true",
        help="with --config: allow the code the config names to run (a module:function model, "
        "trust_remote_code, a Hugging Face folder with auto_map); as trust_code: true",
    ),
)
def cmd_soup(args: argparse.Namespace) -> None:
    """Run the soup stage (notebook 02), or with --config soup your own checkpoints (mmsoup.own)."""
    from mmsoup.profiles import get_profile

    if args.config is not None:
        from mmsoup.own import cmd_soup as soup_own

        return soup_own(args)

    get_profile(args.profile)
    from mmsoup.recipes import recipe

    for name in args.recipe or ():
        recipe(name)  # an unknown name: one sentence listing the recipes
    from mmsoup import pipeline

    run_dir = check_writable(args.run_dir or Path("runs") / args.profile, "--run-dir")
    check_cache(args)  # the digits sets are built there on first use
    recipes = tuple(args.recipe) if args.recipe else None
    print(pipeline.soup_stage(args.profile, run_dir, recipes).to_string(index=False))


@command(
    "inspect",
    "pre-flight of your own checkpoints: accuracy on the line to the best model, update angles",
    arg("--config", required=True, help="the YAML soup config (as for soup --config)"),
    arg("--device", default=None, help="torch device (overrides device:)"),
    arg(
        "--trust-code",
        action="store_true",
        help="allow the code the config names to run (as trust_code: true)",
    ),
)
def cmd_inspect(args: argparse.Namespace) -> None:
    """Print the pre-flight table of mmsoup.own.inspect_pool."""
    from mmsoup.own import cmd_inspect as inspect_own

    inspect_own(args)


@command("evaluate", "evaluate every model and soup of a run folder", PROFILE, RUN_DIR)
def cmd_evaluate(args: argparse.Namespace) -> None:
    """Run the evaluation stage (notebook 03) from the command line."""
    from mmsoup.profiles import get_profile

    get_profile(args.profile)
    run_dir = check_writable(args.run_dir or Path("runs") / args.profile, "--run-dir")
    check_cache(args)  # the digits sets are built there on first use
    from mmsoup import pipeline

    acc = pipeline.evaluate_stage(args.profile, run_dir)
    print(acc.pivot_table(index="method", columns="set", values="accuracy", sort=False).round(2))


@command(
    "reproduce",
    "run notebooks 01-05 headlessly with papermill and write Figure 2 and Table 1",
    PROFILE,
    RUN_DIR,
    arg("--out", type=Path, default=Path("figures"), help="where figures and tables go"),
    arg(
        "--executed",
        type=Path,
        default=None,
        help="also write the executed notebooks here, with the default paths (e.g. notebooks/executed)",
    ),
    arg(
        "--results",
        type=Path,
        default=None,
        help="also copy the run's results without checkpoints here (e.g. results/embedded)",
    ),
    arg(
        "--compare",
        action="store_true",
        help="write the executed chapters, results and figures into <run-dir>/publish (not over "
        "the committed files) and end with one line: identical to the committed run, or how it "
        "differs (make reproduce)",
    ),
)
def cmd_reproduce(args: argparse.Namespace) -> None:
    """The headless study: fine-tune, soups, evaluation, Figure 2, Table 1 (README)."""
    from mmsoup.profiles import get_profile
    from mmsoup.replicates import compare
    from mmsoup.reproduce import (
        EXECUTED,
        FIGURES,
        RESULTS,
        compare_with_committed,
        prepare_staging,
        rebuild_figures,
        reproduce,
    )

    check_cache(args)  # the notebooks build the digits there
    run_dir = args.run_dir or Path("runs") / args.profile
    out, executed, results = args.out, args.executed, args.results
    if args.compare:
        if executed is not None or results is not None:
            raise MMSoupError(
                "--compare writes into <run-dir>/publish; leave out --executed and --results."
            )
        staging = prepare_staging(check_writable(run_dir, "--run-dir"))
        out, executed, results = staging / FIGURES, staging / EXECUTED, staging / RESULTS
    times = reproduce(args.profile, out=out, run_dir=run_dir, executed=executed, results=results)
    total = sum(times.values())
    for name, seconds in times.items():
        _log(f"{name:<22} {seconds:7.0f} s  ({seconds / total:5.1%})")
    _log(f"{'total':<22} {total:7.0f} s; figures and tables in {out}")
    if get_profile(args.profile).search == "random":  # a study with sweeps to replicate
        print(compare(run_dir, args.profile, Path(out) / "replicates.csv"))
    if args.compare:
        rebuild_figures(results, out, args.profile)  # what `make figures` draws from these results
        print(compare_with_committed(staging).line(staging), flush=True)


@command(
    "publish",
    "make a staged run (make reproduce) the committed reference: notebooks/executed, "
    "results/embedded and figures (make publish)",
    PROFILE,
    RUN_DIR,
)
def cmd_publish(args: argparse.Namespace) -> None:
    """Copy <run-dir>/publish over the repository's committed files."""
    from mmsoup.reproduce import publish_run, staging_dir

    run_dir = args.run_dir or Path("runs") / args.profile
    written = publish_run(run_dir)
    print(f"published {len(written)} files from {staging_dir(run_dir)}")


@command(
    "figures",
    "redraw Figure 2, Table 1, the replicate figure and notebook 07's figures from committed results",
    PROFILE,
    arg(
        "--results",
        type=Path,
        default=Path("results/embedded"),
        help="a run's results without checkpoints (default: results/embedded, committed)",
    ),
    arg("--out", type=Path, default=Path("figures"), help="where figures and tables go"),
)
def cmd_figures(args: argparse.Namespace) -> None:
    """`make figures`: the study's figures and tables in seconds, without re-running it."""
    from mmsoup.reproduce import rebuild_figures

    start = time.perf_counter()
    written = rebuild_figures(args.results, args.out, args.profile)
    for path in written:
        print(path)
    _log(f"{len(written)} files from {args.results} in {time.perf_counter() - start:.1f} s")


@command(
    "distributed",
    "a soup with the held-out set sharded over ranks (run under torchrun; see README)",
    arg("rest", nargs=argparse.REMAINDER, help="arguments of `mmsoup distributed` (--help there)"),
)
def cmd_distributed(args: argparse.Namespace) -> int | None:
    """`mmsoup distributed` (mmsoup.distributed_cli; torch.distributed, under torchrun or not)."""
    from mmsoup.distributed_cli import main as distributed_main

    return distributed_main(args.rest[1:] if args.rest[:1] == ["--"] else args.rest)


@command(
    "ablation",
    "the conditions ablation (held-out size, MMS budget, pool size): figures/ablation.{csv,md,png}",
    arg(
        "--replicates",
        type=integer(2, " (a spread needs at least 2 replicates)"),
        default=5,
        help="replicates per condition (default: 5)",
    ),
    arg("--conditions", nargs="+", default=None, help="conditions to run (default: all)"),
    arg(
        "--recipes",
        nargs="+",
        default=None,
        help="recipes per condition (default: Uniform soup, Greedy soup, MMS-C8)",
    ),
    arg("--base", default="embedded", help="the profile the conditions change (default: embedded)"),
    arg("--root", type=Path, default=Path("runs/ablation"), help="run folders, with checkpoints"),
    arg(
        "--results",
        type=Path,
        default=Path("results/ablation"),
        help="where each finished condition's results go, without checkpoints (committed)",
    ),
    arg("--out", type=Path, default=Path("figures"), help="where ablation.{csv,md,png} go"),
    arg("--index", type=integer(0), default=None, help="run only replicate K"),
    arg(
        "--jobs",
        type=integer(1),
        default=1,
        help="replicate processes at once (default: 1; each already uses 2 cores)",
    ),
    arg("--summary-only", action="store_true", help="only rewrite the summary from --results"),
    arg(
        "--executed",
        type=Path,
        default=None,
        help="also execute chapter 09 on --results and write its executed copy here",
    ),
)
def cmd_ablation(args: argparse.Namespace) -> None:
    """The conditions ablation (mmsoup.ablation): resumable, one folder per condition and replicate."""
    from mmsoup import ablation
    from mmsoup.recipes import recipe

    conditions = args.conditions or list(ablation.CONDITIONS)
    recipes = args.recipes or list(ablation.METHODS)
    for c in conditions:
        ablation.spec(c, 0, args.base)  # an unknown condition or profile fails before any work
    for name in recipes:
        recipe(name)
    if not args.summary_only:
        check_writable(args.root, "--root")
        check_writable(args.results, "--results")
        check_cache(args)
        if args.index is not None:
            ablation.run_replicate(
                args.index, args.root, conditions, recipes, args.base, args.results
            )
            return
        ablation.run(
            args.replicates, args.root, conditions, recipes, args.base, args.jobs, args.results
        )
    check_writable(args.out, "--out")
    if args.root.is_dir():  # the shared sweeps' wall times, for the cost of each condition
        ablation.publish_pools(args.root, args.results)
    paths = ablation.write_summary(args.results, args.out)
    print(Path(paths[1]).read_text())
    if args.executed is not None:  # chapter 09 reads only the published results
        import tempfile

        from mmsoup.reproduce import notebooks_dir, publish, run_notebook

        executed = check_writable(args.executed, "--executed").resolve()
        results = args.results.resolve()
        params = {"profile": args.base, "ablation_dir": str(results)}
        with tempfile.TemporaryDirectory() as tmp:
            done = run_notebook("09_when_mms_helps", params, Path(tmp), stream=False)
            here = {results: "../results/ablation", notebooks_dir(): ".", Path(tmp): "."}
            _log(f"chapter 09 executed: {publish(done, executed / done.name, here)}")
            paper = args.root.resolve() / "paper" / "r0"  # the λ explorer opens its MMS step
            if (paper / "ablation.json").is_file():
                params = {"profile": args.base, "ablation_run": str(paper), "interactive": False}
                done = run_notebook("06_lambda_explorer", params, Path(tmp), stream=False)
                here = {
                    args.root.resolve(): "../runs/ablation",
                    notebooks_dir(): ".",
                    Path(tmp): ".",
                }
                _log(f"chapter 06 executed: {publish(done, executed / done.name, here)}")


@command(
    "replicate",
    "run the study R times, one sweep seed each, and write figures/replicates.{csv,md,png}",
    PROFILE,
    arg(
        "--replicates",
        type=integer(2, " (a spread needs at least 2 replicates)"),
        default=5,
        help="number of replicates R (default: 5)",
    ),
    arg(
        "--root",
        type=Path,
        default=None,
        help="folder of the replicates (default: runs/replicates/<profile>)",
    ),
    arg("--out", type=Path, default=Path("figures"), help="where replicates.{csv,md,png} go"),
    arg(
        "--index",
        type=integer(0),
        default=os.environ.get("SLURM_ARRAY_TASK_ID"),
        help="run only replicate K (0..R-1; a scheduler's array task; default: $SLURM_ARRAY_TASK_ID)",
    ),
    arg(
        "--jobs",
        type=integer(1),
        default=1,
        help="replicates at once, one process each (default: 1)",
    ),
    arg("--vary-backbone", action="store_true", help="replicate r also pretrains with seed r"),
    arg(
        "--summary-only",
        action="store_true",
        help="only rewrite the summary from finished replicates",
    ),
)
def cmd_replicate(args: argparse.Namespace) -> None:
    """The replicate study (mmsoup.replicates): resumable, one folder per replicate."""
    from mmsoup import replicates as rep

    rep.replicate_spec(args.profile, 0)  # a wrong or sweep-less profile fails before any work
    if args.index is not None and args.index >= args.replicates:
        raise MMSoupError(f"--index {args.index} is out of range; use 0..{args.replicates - 1}.")
    root = args.root or Path("runs") / "replicates" / args.profile.replace(":", "_")
    if args.summary_only:
        if not root.is_dir():
            raise MMSoupError(
                f"--root {root} does not exist; run the replicates first or pass their folder."
            )
    else:
        check_writable(root, "--root")
        check_cache(args)
    if args.index is not None:
        rep.run_replicate(args.profile, args.index, root, args.vary_backbone)
        return
    check_writable(args.out, "--out")
    start = time.perf_counter()
    if not args.summary_only:
        rep.run_replicates(args.profile, args.replicates, root, args.vary_backbone, args.jobs)
    _, table, paths = rep.write_summary(root, args.profile, args.out, args.replicates)
    print(Path(paths[1]).read_text())
    _log(f"replicates in {root}; {', '.join(map(str, paths))}; {time.perf_counter() - start:.0f} s")
