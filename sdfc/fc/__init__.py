"""Function Compute glue: the instance lifecycle routes (`/initialize`, `/pre-stop`, `/invoke`), FC 3.0's
HTTP event translated to a WSGI call, and the compositions each FC function serves (see functions/).

Nothing here is needed locally: `sdfc serve` composes the same blueprints without it.
"""
