"""Benchmark and peer tooling outside the runtime (the ``bench`` extra; worker images do not carry it):
``stadi bench speed`` (every strategy and the peer engine side by side), ``stadi bench fidelity`` (PSNR and
SSIM of plans against the serial image), and the rank runners they launch (``speed_rank``, ``parity``,
``xdit_driver``)."""
