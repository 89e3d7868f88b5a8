"""Running as a system service: sd_notify, liveness / stop signalling, systemd units, log formats."""
