"""The original notebooks' flows as scripts, and the tiny weights the notebook tests run on."""
