"""The safehold command line: argument parsing and output over the library."""
