"""Speed runs behind ``facesearch bench speed <name>`` (also ``python -m facesearch.benchmarks.speed.<name>``)."""
