"""Check the command line before Hydra starts: every job of a sweep is composed and checked,
and its model and data sources are opened, so bad input fails in one line before any
training and before any MLflow run exists. --help, --info and --cfg check and open nothing."""

from __future__ import annotations

import sys
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException

from harness.data.chat_format import ConversationError
from harness.config import CONF_DIR, CONFIG_NAME, ConfigError, ranks_need_a_launcher_without_submitit, validate
from harness.runs.credentials import redact


class InputError(Exception):
    pass


def prints_only(argv: list[str]) -> bool:
    """--help, --hydra-help, --info, --shell-completion and --cfg: Hydra prints, no job runs."""
    args, _ = get_args_parser().parse_known_args(argv)
    return bool(args.help or args.hydra_help or args.info or args.shell_completion or args.cfg)


def job_overrides(argv: list[str]) -> list[list[str]] | None:
    """The overrides of every job the command line asks for; None for help-like flags and
    --cfg, which only print (and so open no model or data source).

    Sweeps come from the command line and, as in Hydra's basic sweeper, from
    `hydra.sweeper.params` (which experiment presets may set)."""
    if prints_only(argv):
        return None
    args, _ = get_args_parser().parse_known_args(argv)
    overrides = list(args.overrides)
    if args.multirun:
        overrides = [f"{k}={v}" for k, v in _sweeper_params(overrides).items()] + overrides
    return expand_jobs(overrides, args.multirun)


def expand_jobs(overrides: list[str], multirun: bool = True) -> list[list[str]]:
    """One list of overrides per job, as Hydra's basic sweeper expands them (hydra.* left out)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise InputError(str(e).splitlines()[0]) from None
    parsed = [o for o in parsed if not o.get_key_element().lstrip("+~").startswith("hydra")]
    if not multirun:
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweeps:
            raise InputError(f"{sweeps[0]} is a sweep; add -m (--multirun) to run one job per value")
        return [[o.input_line for o in parsed]]
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _sweeper_params(overrides: list[str]) -> dict[str, str]:
    """`hydra.sweeper.params` of the config the command line composes (empty if none)."""
    base = [o for o in overrides if "," not in o.split("=", 1)[-1]]  # one value per key is enough here
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose(CONFIG_NAME, overrides=base, return_hydra_config=True)
        except HydraException:
            return {}  # reported with the job's own overrides below
        return dict(cfg.hydra.sweeper.get("params") or {})


def _missing_config_message(e: MissingConfigException, overrides: list[str]) -> str:
    group = (e.missing_cfg_file or "").rsplit("/", 1)[0] if e.missing_cfg_file else ""
    chosen = next((o for o in overrides if o.lstrip("+").split("=")[0] == group), e.missing_cfg_file)
    if e.options:
        return f"{chosen} is not a known option; choose one of: {', '.join(sorted(e.options))}"
    return str(e).splitlines()[0]


def check_command_line(argv: list[str]) -> None:
    jobs = job_overrides(argv)
    if jobs is None:
        return
    # the model and data stack (torch, transformers, datasets, mlflow) loads only now that jobs will run
    from harness.distributed import world_from_env
    from harness.model.loading import ModelError, load_tokenizer
    from harness.data.sources import DataError, load_source
    from harness.data.tokenise import prepare_data
    from harness.runs.tracking import check_server

    args, _ = get_args_parser().parse_known_args(argv)
    launcher = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("hydra/launcher=")), "")
    user_errors = (ConfigError, DataError, ModelError, ConversationError)
    opened: set[str] = set()
    servers: set[str] = set()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for overrides in jobs:
            try:
                cfg = compose(CONFIG_NAME, overrides=overrides)
            except MissingConfigException as e:
                raise InputError(_missing_config_message(e, overrides)) from None
            except HydraException as e:
                raise InputError(" ".join(str(e).split())[:300]) from None
            try:
                validate(cfg)
                if cfg.trainer.ranks_per_job > 1 and launcher == "submitit_local":
                    raise ranks_need_a_launcher_without_submitit(cfg.trainer.ranks_per_job, f"hydra/launcher={launcher}")
                if cfg.tracking.uri not in servers:
                    servers.add(cfg.tracking.uri)
                    check_server(cfg.tracking.uri)
                key = str((cfg.model, cfg.data))
                if key not in opened:  # each distinct model and data source once
                    opened.add(key)
                    check_data = cfg.data.kind != "synthetic" and world_from_env().is_main
                    if check_data:
                        load_source(cfg.data)  # bad data fails before a model is downloaded or converted
                    tokenizer = load_tokenizer(cfg.model)
                    if check_data:
                        prepare_data(cfg.data, tokenizer)  # cached: the job reuses it
            except (*user_errors, ConnectionError) as e:
                raise InputError(str(e)) from None


def main_or_exit(argv: list[str]) -> None:
    if prints_only(argv):  # nothing to open, and nothing heavy to import: --help and --cfg stay quick
        args, _ = get_args_parser().parse_known_args(argv)
        if args.multirun and (args.cfg or args.info):
            flag = "--cfg" if args.cfg else "--info"
            print(f"error: {flag} prints one job's config and runs nothing; leave out -m", file=sys.stderr)
            sys.exit(2)
        return
    import datasets

    from harness.runs.tracking import bound_http_retries

    bound_http_retries()
    datasets.disable_progress_bars()  # keep a failing check to its one line
    try:
        check_command_line(argv)
    except InputError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        sys.exit(2)
    finally:
        datasets.enable_progress_bars()
