"""The folding network: ESMFold's trunk and heads over an adapted ESM-2, how it is built, and its losses."""
