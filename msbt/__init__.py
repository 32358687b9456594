"""msbt: multistage transfer learning (ImageNet -> cancer cell lines -> breast ultrasound) on Ray."""

__version__ = "0.1.0"
