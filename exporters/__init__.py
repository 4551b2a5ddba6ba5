"""Exporters, one module per device runtime (installed as `ondevice_lora.exporters`)."""
