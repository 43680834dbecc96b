"""Request and response bodies of the per-VM API, with Firecracker's field names (its swagger document,
firecracker.yaml). Every model forbids unknown fields and checks types strictly, so ``{"vcpu_count": "2"}`` or
a misspelt field is a 400 that names the field, as Firecracker answers."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MachineConfiguration(_Body):
    """PUT /machine-config (both required) and the answer of GET /machine-config."""

    vcpu_count: int = Field(ge=1, le=32)
    mem_size_mib: int = Field(ge=1, le=64 * 1024)
    smt: bool = False
    track_dirty_pages: bool = False


class MachineConfigurationPatch(_Body):
    """PATCH /machine-config: any subset of the fields."""

    vcpu_count: int | None = Field(default=None, ge=1, le=32)
    mem_size_mib: int | None = Field(default=None, ge=1, le=64 * 1024)
    smt: bool | None = None
    track_dirty_pages: bool | None = None


class BootSource(_Body):
    """PUT /boot-source."""

    kernel_image_path: str = Field(min_length=1)
    boot_args: str | None = None
    initrd_path: str | None = None


class Drive(_Body):
    """PUT /drives/{drive_id}: a raw disk image as a virtio-blk device."""

    drive_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    path_on_host: str = Field(min_length=1)
    is_root_device: bool
    is_read_only: bool = False
    partuuid: str | None = None
    cache_type: str | None = Field(default=None, pattern=r"^(Unsafe|Writeback)$")


class PartialDrive(_Body):
    """PATCH /drives/{drive_id}."""

    drive_id: str = Field(min_length=1, max_length=64)
    path_on_host: str | None = Field(default=None, min_length=1)


class NetworkInterface(_Body):
    """PUT /network-interfaces/{iface_id}: a virtio-net card whose other end is the host TAP
    ``host_dev_name`` (it must exist); ``guest_mac`` as 12 hex digits with colons (default: random,
    locally administered). Rate limiters are not supported, so they are unknown fields here."""

    iface_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    host_dev_name: str = Field(min_length=1, max_length=15)
    guest_mac: str | None = Field(default=None, pattern=r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


class EntropyDevice(_Body):
    """PUT /entropy: a virtio-rng device (rate limiting is not supported, so no other fields)."""


class ActionType(str, Enum):
    FlushMetrics = "FlushMetrics"
    InstanceStart = "InstanceStart"
    SendCtrlAltDel = "SendCtrlAltDel"


class InstanceActionInfo(_Body):
    """PUT /actions."""

    model_config = ConfigDict(extra="forbid", strict=False)   # the enum is given as its string
    action_type: ActionType


class VmState(str, Enum):
    Paused = "Paused"
    Resumed = "Resumed"


class Vm(_Body):
    """PATCH /vm."""

    model_config = ConfigDict(extra="forbid", strict=False)
    state: VmState


class SnapshotType(str, Enum):
    Full = "Full"
    Diff = "Diff"


class SnapshotCreateParams(_Body):
    """PUT /snapshot/create."""

    model_config = ConfigDict(extra="forbid", strict=False)
    mem_file_path: str = Field(min_length=1)
    snapshot_path: str = Field(min_length=1)
    snapshot_type: SnapshotType = SnapshotType.Full
    version: str | None = None


class MemoryBackend(_Body):
    model_config = ConfigDict(extra="forbid", strict=False)
    backend_path: str = Field(min_length=1)
    backend_type: str = Field(pattern=r"^File$")


class SnapshotLoadParams(_Body):
    """PUT /snapshot/load: give the memory as ``mem_backend`` (or the older ``mem_file_path``)."""

    model_config = ConfigDict(extra="forbid", strict=False)
    snapshot_path: str = Field(min_length=1)
    mem_file_path: str | None = Field(default=None, min_length=1)
    mem_backend: MemoryBackend | None = None
    enable_diff_snapshots: bool = False
    track_dirty_pages: bool = False
    resume_vm: bool = False


class Logger(_Body):
    """PUT /logger."""

    log_path: str = Field(min_length=1)
    level: str | None = Field(default=None, pattern=r"^(Error|Warning|Info|Debug|Trace|Off)$")
    show_level: bool = False
    show_log_origin: bool = False
    module: str | None = None


class Metrics(_Body):
    """PUT /metrics."""

    metrics_path: str = Field(min_length=1)


class VmConfigFile(_Body):
    """Firecracker's JSON configuration file (``--config-file``), the same shape as GET /vm/config."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    boot_source: BootSource = Field(alias="boot-source")
    drives: list[Drive] = []
    machine_config: MachineConfiguration | None = Field(default=None, alias="machine-config")
    entropy: EntropyDevice | None = None
    network_interfaces: list[NetworkInterface] = Field(default=[], alias="network-interfaces")
    logger: Logger | None = None
    metrics: Metrics | None = None
