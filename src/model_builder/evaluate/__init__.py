"""Did quantization hold? The accuracy gate, measurements, the contract check, the performance
figures and the build report.
"""
