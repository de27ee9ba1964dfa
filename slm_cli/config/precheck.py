"""Check a stage's command line before Hydra runs it: every problem at once, exit 2, nothing written.

Hydra stops at the first override it cannot apply and exits 1 with advice that misleads here
(`train.max_step=5` gets "use +train.max_step=5", which slm then refuses as an unknown key;
`model=tiny-lama` gets a list of the options but no hint which one was meant). And by the time
a stage's own validation runs, Hydra has already created the run folder.

So the dispatcher composes the config once with Hydra's own loader, exactly as `@hydra.main`
will (same search path, `--config-dir`, `--config-name`, run or multirun mode), before handing
the command line over. An override Hydra cannot apply is set aside and named with a did-you-mean,
the rest is composed again, and the result is validated against the stage's schema, so a typo
and a NaN on the same line are reported together. Only Hydra and OmegaConf are imported.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Optional

from slm_cli.config.validate import ConfigError, validate
from slm_cli.paths import CONFIG_DIR

# The sweep variants composed for a multirun at most (each sweep value is composed once, not every combination).
MAX_VARIANTS = 64


def check_command_line(stage: str, args: list[str], schema: type) -> list[Any]:
    """Raise ConfigError naming every override Hydra cannot apply and every invalid value.

    Else return the validated config of each run the line makes (one, or one per sweep value of a
    multirun; none for --cfg/--help), for checks a stage can make before Hydra starts.
    """
    from hydra._internal.utils import get_args_parser

    parsed = get_args_parser().parse_args(args)
    if parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion or parsed.config_path:
        return []  # nothing runs, or a config location we do not mirror: Hydra answers on its own
    source = f"config of `slm {stage}`"
    config_name = parsed.config_name or stage
    from hydra.core.global_hydra import GlobalHydra

    try:
        hydra = _hydra(parsed.config_dir, source)
        problems: list[str] = []
        configs: list[Any] = []
        multirun = parsed.multirun or "hydra.mode=MULTIRUN" in parsed.overrides
        for variant, strict in _variants(parsed.overrides, multirun, source):
            found, typed = _check_variant(hydra, config_name, variant, strict, schema, validate_values=parsed.cfg is None)
            problems += [p for p in found if p not in problems]
            configs += [typed] if typed is not None else []
    finally:
        GlobalHydra.instance().clear()
    if problems:
        raise ConfigError(problems, source)
    return configs


def _hydra(config_dir: Optional[str], source: str) -> Any:
    """A Hydra instance with the search path `@hydra.main` builds for a stage (hydra/_internal/utils.py _run_hydra)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    search_path = create_automatic_config_search_path(None, None, str(CONFIG_DIR))
    if config_dir is not None:
        folder = os.path.abspath(config_dir)
        if not os.path.isdir(folder):
            raise ConfigError([f"--config-dir {config_dir}: no such folder"], source)
        search_path.prepend(provider="command-line", path=f"file://{folder}", anchor=SearchPathQuery(provider="schema"))
    return Hydra.create_main_hydra2(task_name="slm", config_search_path=search_path)


def _variants(overrides: list[str], multirun: bool, source: str) -> list[tuple[list[str], bool]]:
    """The override lists to compose: the line itself, or for `-m` one list per sweep value.

    A sweep's first value stands in for it in every list but its own, so each value is checked
    once (not every combination). The bool says whether a failure that names no override is
    reported: for the extra lists it is not, as rebuilding a value from a sweep can differ
    from what Hydra's sweeper passes; Hydra still checks those when it runs them.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    if not multirun:
        return [(list(overrides), True)]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        raise ConfigError([str(exc).strip()], source) from None
    choices: list[list[str]] = []
    for o in parsed:
        values = [o.input_line]
        if o.is_sweep_override():
            try:
                values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            except HydraException:  # interval and glob sweeps cannot be listed here; the sweeper expands them
                values = []
        choices.append(values)
    base = [values[0] for values in choices if values]
    out = [(base, True)]
    for i, values in enumerate(choices):
        for value in values[1:]:
            if len(out) >= MAX_VARIANTS:
                return out
            variant = list(base)
            variant[sum(1 for v in choices[:i] if v)] = value
            out.append((variant, False))
    return out


def _check_variant(hydra: Any, config_name: str, overrides: list[str], strict: bool, schema: type,
                   validate_values: bool) -> tuple[list[str], Any]:
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    cfg, refused, other = _compose(hydra, config_name, overrides, RunMode.RUN)
    problems = [_explain(kind, override, detail, cfg) for kind, override, detail in refused]
    if other is not None:
        return problems + ([other] if strict else []), None
    typed = None
    if validate_values and cfg is not None:  # the overrides set aside are named above; check the rest too
        try:
            values = _values(cfg)
            _adopt_deepspeed_json(hydra, values, overrides)
            typed = validate(values, schema)
        except ConfigError as exc:
            problems += exc.problems
        except OmegaConfBaseException as exc:  # an interpolation that does not resolve
            problems.append(" ".join(str(exc).split()))
    return problems, typed


def _compose(hydra: Any, config_name: str, overrides: list[str], mode: Any):
    """Compose, setting aside each override Hydra refuses, until the rest composes.

    Returns (config or None, [(kind, override, detail)] set aside, a failure that names no override).
    """
    import yaml
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    remaining, refused = list(overrides), []
    for _ in range(len(overrides) + 1):
        try:
            return hydra.compose_config(config_name, remaining, run_mode=mode, with_log_configuration=False), refused, None
        except MissingConfigException as exc:
            found, text = _missing_option(exc, remaining), _first_paragraph(str(exc))
        except OverrideParseException as exc:
            found, text = None, " ".join(str(exc).split())
        except ConfigCompositionException as exc:
            found, text = _refused_key(exc, remaining), " ".join(str(exc).split())
        except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:  # e.g. a config file that is not valid YAML
            found, text = None, " ".join(str(exc).split())
        if found is None:
            return None, refused, text
        refused.append(found)
        remaining.remove(found[1])
    return None, refused, None


def _first_paragraph(text: str) -> str:
    return " ".join(text.strip().split("\n\n")[0].split())


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _missing_option(exc: Any, overrides: list[str]) -> Optional[tuple[str, str, Any]]:
    missing = getattr(exc, "missing_cfg_file", None) or ""
    group, _, option = missing.rpartition("/")
    for o in overrides:
        if group and _key(o) == group and not o.startswith("~"):
            return "option", o, (group, option, list(getattr(exc, "options", None) or []))
    return None


_REFUSED = [
    ("key", re.compile(r"Could not override '([^']+)'")),
    ("delete", re.compile(r"Could not delete from config\. '([^']+)' does not exist")),
    ("append", re.compile(r"Could not append to config\. An item is already at '([^']+)'")),
]


def _refused_key(exc: Any, overrides: list[str]) -> Optional[tuple[str, str, Any]]:
    text = str(exc)
    for kind, pattern in _REFUSED:
        m = pattern.search(text)
        if m:
            for o in overrides:
                if _key(o) == m.group(1):
                    return kind, o, m.group(1)
    return None


def _explain(kind: str, override: str, detail: Any, cfg: Any) -> str:
    if kind == "option":
        group, option, options = detail
        close = difflib.get_close_matches(option, options, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{group}={option}: no such option in group {group}{hint} (options: {', '.join(options) or 'none'})"
    key = detail
    if kind == "append":
        return f"{override}: {key} is already in the config; set it without the +: {override.lstrip('+')}"
    return _unknown_key(key, cfg)


def _unknown_key(key: str, cfg: Any) -> str:
    """`unknown key 'train.max_step'; did you mean train.max_steps? (valid keys here: ...)`, from the composed config."""
    if cfg is None:
        return f"unknown key {key!r}"
    from omegaconf import OmegaConf

    node: Any = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    parts = key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if node is None:
            return f"unknown key {key!r}: {where} is null here, so it has no settings to change; choose one first ({where}=...)"
        if not isinstance(node, dict):
            return f"unknown key {key!r}: {where} is a single value ({node!r}), not a group of settings"
        if part not in node:
            options = sorted(f.stem for f in (CONFIG_DIR / part).glob("*.yaml")) if i == 0 else []
            if options:  # a group this stage leaves unset, like eval's model
                return (f"unknown key {key!r}: {part} is not chosen here; choose an option first, {part}=<option> "
                        f"(options: {', '.join(options)})")
            close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
            hint = f"; did you mean {'.'.join([*parts[:i], close[0], *parts[i + 1:]])}?" if close else ""
            return f"unknown key {key!r}{hint} (valid keys here: {', '.join(str(k) for k in node)})"
        node = node[part]
    return f"unknown key {key!r}"


def _adopt_deepspeed_json(hydra: Any, values: dict, overrides: list[str]) -> None:
    """Take in deepspeed.config_file's settings as the stage will (runner.run_stage), so the config
    checked is the one that runs: `deepspeed.offload_optimizer=cpu` beside a JSON that says ZeRO-2 is valid."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from slm_cli.engine.dsconfig import adopt_user_config, explicit_from

    if not (values.get("deepspeed") or {}).get("config_file"):
        return
    base = hydra.compose_config(values["stage"], [], run_mode=RunMode.RUN, with_log_configuration=False)
    defaults = {g: OmegaConf.to_container(base[g], resolve=True) for g in ("train", "deepspeed") if g in base}
    adopt_user_config(values, explicit_from(values, overrides, defaults))


def _values(cfg: Any) -> dict:
    """The composed config as the stage will see it: interpolations resolved, `hydra` dropped."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        # Hydra fills runtime.output_dir only when the job starts; the run dir is what it will be.
        cfg.hydra.runtime.output_dir = os.path.abspath(str(OmegaConf.select(cfg, "hydra.run.dir", default="outputs")))
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
