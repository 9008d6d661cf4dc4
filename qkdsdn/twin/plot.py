"""Plots of the twin's physics model: secret key rate against fibre length."""
from __future__ import annotations

import math
from pathlib import Path

from db.netfile import Device, Network
from qkdsdn.twin.physics import (channel_transmittance, cutoff_distance_km, device_performance,
                                 performance, plob_bound_bps)

_SAMPLES = 601


def _curves(devices: dict[str, Device] | Network,
            attenuation_db_km: float) -> list[tuple[str, Device, float]]:
    """(label, device, attenuation) per curve; links sharing a device and fibre share a curve."""
    if not isinstance(devices, Network):
        return [(name, dev, attenuation_db_km) for name, dev in devices.items()]
    groups: dict[tuple[Device, float], list[str]] = {}
    for link in devices.links:
        if link.device is not None:
            groups.setdefault((link.device, link.attenuation_db_km), []).append(link.name)
    curves = []
    for (dev, att), names in groups.items():
        label = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
        curves.append((f"{label} ({dev.model}, {att:g} dB/km)", dev, att))
    return curves


def plot_skr_vs_distance(devices: dict[str, Device] | Network, out_path: str | Path,
                         max_km: float = 300.0, attenuation_db_km: float = 0.2) -> None:
    """Write a PNG of the expected secret key rate (log scale) against fibre length.

    ``devices`` is either named devices, all on fibre of ``attenuation_db_km``, or a
    network: then every distinct device (and fibre) of its links is a curve and
    every link is marked at its length. Each curve has its PLOB bound, dashed in
    the same colour, at the same clock rate and total transmittance (for the
    fixed model, which knows no device losses, the bare fibre's).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not max_km > 0:
        raise ValueError(f"max_km must be positive, got {max_km}")
    curves = _curves(devices, attenuation_db_km)
    if isinstance(devices, Network):
        lengths = [link.length_km for link in devices.links if link.device is not None]
        max_km = max([max_km, *(1.05 * x for x in lengths)])
    if not curves:
        raise ValueError("nothing to plot: no emulated devices")
    distances = np.linspace(0.0, max_km, _SAMPLES)

    # A Figure without pyplot: no global state, safe to call from server threads.
    fig = Figure(figsize=(8.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positives: list[float] = []
    colours = [f"C{i % 10}" for i in range(len(curves))]
    for (label, dev, att), colour in zip(curves, colours):
        skr = np.array([device_performance(dev, float(d), att).skr_bps for d in distances])
        positives += [float(v) for v in skr if v > 0]
        if dev.model == "fixed":
            # A stated rate does not depend on distance; where it crosses the PLOB bound
            # the statement is unphysical for that length.
            ax.plot(distances, np.where(skr > 0, skr, np.nan), color=colour, lw=1.4, ls="-.",
                    label=f"{label}, distance-independent")
        else:
            ax.plot(distances, np.where(skr > 0, skr, np.nan), color=colour, lw=1.8, label=label)
        # The fixed model knows no device losses: its bound is the bare fibre's (loosest).
        lossy = dev.model == "decoy-bb84"
        plob = np.array([plob_bound_bps(channel_transmittance(
            length_km=float(d), attenuation_db_km=att,
            insertion_loss_db=dev.insertion_loss_db if lossy else 0.0,
            detector_efficiency=dev.detector_efficiency if lossy else 1.0), dev.clock_rate_hz)
            for d in distances])
        plob = np.where(np.isfinite(plob) & (plob > 0), plob, np.nan)
        positives += [float(v) for v in plob if v > 0]
        ax.plot(distances, plob, color=colour, lw=1.0, ls="--")
        cutoff = cutoff_distance_km(dev, att)
        if 0 < cutoff <= max_km:
            ax.axvline(cutoff, color=colour, lw=0.8, ls=":")
    if not positives:
        raise ValueError("nothing to plot: every device has a zero key rate")
    ceiling = 10.0 ** math.ceil(math.log10(max(positives)))
    # Rates fall steeply just before the cut-off; ten decades keep the plot readable.
    floor = max(10.0 ** math.floor(math.log10(min(positives))), ceiling * 1e-10)

    if isinstance(devices, Network):
        # Links at the same point (equal length and rate) share one marker and label.
        points: dict[tuple[float, float], list[str]] = {}
        for link in devices.links:
            if link.device is not None:
                points.setdefault((link.length_km, performance(link).skr_bps), []).append(link.name)
        # Names stay readable only for a handful of points; larger networks get markers alone.
        labelled = len(points) <= 8
        for (length, rate), names in points.items():
            y = rate if rate > 0 else floor  # a link without key sits on the axis
            ax.plot([length], [y], marker="o" if rate > 0 else "v", color="black", ms=5, zorder=5)
            if labelled:
                text = ", ".join(names[:4]) + (f" +{len(names) - 4}" if len(names) > 4 else "")
                ax.annotate(text, (length, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
        ax.plot([], [], marker="o", color="black", ls="none", ms=5, label="links of the network")

    ax.plot([], [], color="grey", lw=1.0, ls="--", label="PLOB bound (same colour)")
    ax.plot([], [], color="grey", lw=0.8, ls=":", label="cut-off distance")
    ax.set_yscale("log")
    ax.set_ylim(floor, ceiling)
    ax.set_xlim(0.0, max_km)
    ax.set_xlabel("fibre length (km)")
    ax.set_ylabel("secret key rate (bit/s)")
    title = "Secret key rate vs distance"
    if isinstance(devices, Network):
        title += f": {devices.name}"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(str(out_path), format="png")
