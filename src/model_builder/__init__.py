"""edgefleet's central model builder: quantize, gate, baseline, package and sign."""

__all__: list[str] = []
