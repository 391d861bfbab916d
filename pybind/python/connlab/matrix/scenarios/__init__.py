"""The scenarios of the lifecycle matrix, one module per category; importing registers them."""

from connlab.matrix.scenarios import (  # noqa: F401 - imported for their registrations
    churn,
    errors,
    faults,
    halfclose,
    happy,
    leak,
    phantom,
    shutdown,
    timeouts,
)
