"""`import odlora` is `import ondevice_lora`: the command's name works as the package's."""

import sys

import ondevice_lora

sys.modules[__name__] = ondevice_lora
