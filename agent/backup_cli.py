"""`dgdm agent backup --out FILE` and `dgdm agent restore FILE`.

A backup of the agent holds what it cannot rebuild: the outbox (`data_dir/outbox.db`: every
message not yet receipted, the seq high-water mark, the last executed command seq and the
link's state), the registered topologies (`<kernels.cache_dir>/topologies/`: the index
and one `.npz` per topology) and the settings the coordinator set with `set_config`
(`data_dir/remote-config.json`, if it ever did; a restore checks them as a start would, so
it does not leave an agent that refuses to start). Not in it: compiled models and other
caches (rebuilt on demand), and the keys and config in /etc/dgdm (back them up with the
config; the outbox's messages are sealed with the device's key, so restore onto the same
device identity). The work is in `sync/backup.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dgdm.agent.config import AgentConfig

LOCK_NAME = "agent.lock"


def register(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from dgdm.sync.backup_cli import add_backup_and_restore

    add_backup_and_restore(
        actions,
        "agent",
        "the outbox, registered topologies and the coordinator's settings",
        _backup,
        _restore,
    )


def lock_path(config: AgentConfig) -> Path:
    """The lock the running agent holds shared and a restore takes exclusively."""
    return config.device.data_dir / LOCK_NAME


def parts(config: AgentConfig) -> list[Any]:
    from dgdm.agent import remote_config
    from dgdm.sync.backup import OUTBOX, Part

    cache_dir = config.kernels.cache_dir or config.device.data_dir / "cache"
    return [
        Part("outbox.db", config.device.data_dir / "outbox.db", OUTBOX),
        Part("topologies", cache_dir / "topologies"),
        Part(remote_config.OVERLAY_NAME, remote_config.overlay_path(config), plain_file=True),
    ]


def _config(args: argparse.Namespace) -> AgentConfig:
    from dgdm.agent.config import load_config

    return load_config(getattr(args, "config", None))


def _backup(args: argparse.Namespace) -> int:
    from dgdm.sync import backup

    config = _config(args)
    manifest = backup.create(args.out, "agent", parts(config), {"device_id": config.device.id})
    print(backup.summary(manifest, args.out))
    return 0


def _restore(args: argparse.Namespace) -> int:
    from dgdm.sync import backup, datalock
    from dgdm.sync.errors import ConfigError

    if not args.file.is_file():
        raise ConfigError("FILE", f"{args.file} is not a file")
    config = _config(args)
    data_dir = config.device.data_dir
    with backup.scratch(data_dir, ".dgdm-restore-") as staging:
        manifest = backup.read(args.file, "agent", staging)
        if manifest.get("device_id") != config.device.id:
            raise backup.BackupError(
                f"{args.file} is a backup of device {manifest.get('device_id')!r}, this is "
                f"{config.device.id!r}: its messages are sealed with that device's key"
            )
        _check_remote_config(staging, manifest, config, args.file)
        backup.advance_seqs(staging, manifest, backup.seq_floor())
        with datalock.take_exclusive(lock_path(config), "agent"):
            aside = backup.install(staging, parts(config), manifest["parts"])
    print(backup.restored(manifest, args.file, aside))
    return 0


def _check_remote_config(
    staging: Path, manifest: dict[str, Any], config: AgentConfig, source: Path
) -> None:
    """The coordinator's settings in the backup, checked over this config as the agent's
    start checks them: refused here rather than an agent that exits 2 on the restored data."""
    from dgdm.agent import remote_config
    from dgdm.sync import backup
    from dgdm.sync.errors import ConfigError

    if remote_config.OVERLAY_NAME not in manifest["parts"]:
        return  # an older backup, or a box the coordinator never configured
    staged = staging / remote_config.OVERLAY_NAME
    try:
        remote_config.apply(config, remote_config.load(staged))
    except ConfigError as exc:
        # `load` names the staged path (not worth showing), `apply` the key it refuses.
        failed = "" if exc.key == str(staged) else f"fails this config: {exc.key} "
        raise backup.BackupError(
            f"{source}: its {remote_config.OVERLAY_NAME} {failed}{exc.message}"
        ) from None
