"""Face data: decoding, detection, alignment, the one prepare step, dataset readers and synthetic faces."""
