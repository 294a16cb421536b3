"""Simulated device time: when phones are online, how long their rounds take.

- ``calibration``: seconds per training step of a model on a host, per batch size, as a file;
- ``measure``: measuring them on this host, once per model, cached in ``cache_dir``;
- ``clock``: :class:`~fl_ondevice.devicetime.clock.DeviceClock`, the phones' simulated clock.
"""
