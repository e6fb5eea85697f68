"""Open a MODEL argument (folder, reference name or hub id) as a validated checkpoint with its residual picture."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from normsurgery.arch import Architecture, architecture_of, config_view, load_config
from normsurgery.checkpoint.reader import CheckpointReader
from normsurgery.checkpoint.resolve import resolve_model
from normsurgery.errors import NormSurgeryError

# Buffers some checkpoints carry that are rebuilt from the config on load (never weights).
IGNORED_TENSORS = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq|\.attention\.(masked_)?bias)$")


@dataclass
class ModelSource:
    """A checkpoint ready for surgery: where it is, its lazy reader, its config and its residual picture."""

    spec: str
    path: Path
    reader: CheckpointReader
    arch: Architecture
    _config: Any = None
    _view: Any = None  # config.json read directly (ConfigView), when the transformers config is not built yet
    _validation: threading.Thread | None = None
    _validation_error: list[BaseException] = field(default_factory=list)
    trust_remote_code: bool = False

    @property
    def config(self) -> Any:
        """The transformers config (waits for a background validation to build it; built now if none runs)."""
        self.confirm()
        if self._config is None:
            self._config = load_config(self.reader.config, where=str(self.path / "config.json"), folder=self.path,
                                       trust_remote_code=self.trust_remote_code)
        return self._config

    @property
    def settings(self) -> Any:
        """The config's values: the transformers config once it is built, else config.json read directly, which
        imports transformers only for a value config.json lacks and its class would fill in."""
        self.confirm()
        return self._config if self._config is not None else self._view

    def confirm(self) -> None:
        """Wait for a validation running in the background and raise its error, if any."""
        if self._validation is not None:
            self._validation.join()
            self._validation = None
        if self._validation_error:
            raise self._validation_error[0]

    @property
    def parameter_count(self) -> int:
        """Number of stored parameters (tied weights counted once)."""
        total = 0
        for name in self.reader.names():
            if not IGNORED_TENSORS.search(name):
                total += self.reader.info(name).numel
        return total

    def close(self) -> None:
        """Release open shard handles."""
        self.reader.close()


def open_weights(
    spec: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    scan_finite: bool = True,
    on_tensor: Callable[[str], None] | None = None,
) -> tuple[Path, CheckpointReader]:
    """Resolve and open a checkpoint, checking its files' integrity and (optionally) that every weight is finite."""
    path = resolve_model(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    reader = CheckpointReader.open(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    try:
        if scan_finite:
            for name in reader.names():
                reader.check_finite(name, reader.get(name))
                if on_tensor:
                    on_tensor(name)
    except BaseException:
        reader.close()
        raise
    return path, reader


def open_model(
    spec: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    scan_finite: bool = True,
    on_tensor: Callable[[str], None] | None = None,
    shapes: Literal["now", "background", "unchecked"] = "now",
) -> ModelSource:
    """Open a model of a supported family and validate its tensor names, and the shapes against its config.

    The shapes are checked against the model class transformers builds from the config (seconds of start-up):
    `now`; or on a thread (`background`), while the architecture is read from config.json directly, so the
    caller can start streaming, but must call `confirm()` before trusting any result; or not at all
    (`unchecked`: a copy the user chose not to verify, which must start like a file copy, without torch).
    """
    path, reader = open_weights(
        spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, scan_finite=scan_finite, on_tensor=on_tensor
    )
    where = str(path / "config.json")
    try:
        config = view = None
        arch = None
        if shapes != "now":
            view = config_view(reader.config, where)
            arch = _quick_architecture(view, reader.names()) if view is not None else None
        if arch is None:
            config = load_config(reader.config, where=where, folder=path, trust_remote_code=trust_remote_code)
            arch = architecture_of(config, reader.names())
        validate_names(reader, arch, path)
        if shapes == "now":
            validate_shapes(reader, config, path, trust_remote_code=trust_remote_code)
    except BaseException:
        reader.close()
        raise
    source = ModelSource(spec=spec, path=path, reader=reader, arch=arch, _config=config, _view=view,
                         trust_remote_code=trust_remote_code)
    if shapes == "background":

        def validate() -> None:
            try:
                full = config if config is not None else load_config(reader.config, where=where, folder=path,
                                                                     trust_remote_code=trust_remote_code)
                if architecture_of(full, reader.names()) != arch:
                    raise NormSurgeryError(
                        f"normsurgery read {where} differently from transformers (a bug in normsurgery's config "
                        "reading); nothing was written. Please report it with the config file."
                    )
                source._config = full
                validate_shapes(reader, full, path, trust_remote_code=trust_remote_code)
            except BaseException as err:  # handed to confirm() in the main thread
                source._validation_error.append(err)

        source._validation = threading.Thread(target=validate, name="normsurgery-validation", daemon=True)
        source._validation.start()
    return source


def _quick_architecture(view: Any, stored: list[str]) -> Architecture | None:
    """The architecture of a checkpoint holding `stored` read from config.json alone (`view`), or None when a value
    needs transformers to make sense of."""
    try:
        return architecture_of(view, stored)
    except NormSurgeryError:
        raise
    except Exception:  # a malformed value: the full config says what is wrong
        return None


def validate_names(reader: CheckpointReader, arch: Architecture, path: Path) -> None:
    """Every stored tensor has a role in the residual picture and every expected tensor is stored."""
    roles = arch.roles()
    stored = {n for n in reader.names() if not IGNORED_TENSORS.search(n)}
    if arch.tied:
        stored.discard(arch.unembed.weight)  # some exporters store the tied copy too
    unknown = sorted(stored - set(roles))
    missing = sorted(set(roles) - stored)
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) the config implies (e.g. {', '.join(missing[:3])})")
        if unknown:
            parts.append(f"{len(unknown)} tensor(s) a {arch.family} model does not have (e.g. {', '.join(unknown[:3])})")
        raise NormSurgeryError(
            f"the weights in {path} do not match its config.json ({arch.model_type}, {arch.num_layers} layers): "
            f"{'; '.join(parts)}. The checkpoint is incomplete or belongs to another config; re-export it "
            "or fix config.json."
        )


def validate_shapes(reader: CheckpointReader, config: Any, path: Path, *, trust_remote_code: bool = False) -> None:
    """Each stored tensor has the shape stock transformers builds from the config (checked on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except Exception as err:
            raise NormSurgeryError(
                f"transformers cannot build a model from {path / 'config.json'}: {err}. Fix the config values."
            ) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name in reader.names():
        want = expected.get(name)
        got = tuple(reader.info(name).shape)
        if want is not None and want != got:
            raise NormSurgeryError(
                f"tensor {name} in {path} has shape {list(got)} but config.json implies {list(want)}: the weights "
                "and the config disagree (wrong config.json, or weights from another model). Fix one of them."
            )


def validated_path(spec: str, *, allow_pickle: bool = False) -> Path:
    """Resolve and fully validate any model before loading it: supported families by name and shape,
    normsurgery outputs and other remote-code models by file integrity (their code is gated at load)."""
    from normsurgery.arch import FAMILY_BY_MODEL_TYPE

    path, reader = open_weights(spec, allow_pickle=allow_pickle, trust_remote_code=True)
    reader.close()
    if "auto_map" not in reader.config and reader.config.get("model_type") in FAMILY_BY_MODEL_TYPE:
        open_model(spec, allow_pickle=allow_pickle, scan_finite=False).close()
    return path
