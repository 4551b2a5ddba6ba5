"""What runs on the device (installed as `ondevice_lora.runtime`)."""
