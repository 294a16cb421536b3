"""Simulated device time: when phones are online, how long their rounds take.

- ``calibration``: seconds per training step of a model on this host, measured once and cached;
- ``clock``: :class:`~fl_ondevice.devicetime.clock.DeviceClock`, the phones' simulated clock.
"""
