"""Hardware targets. Each module here exports ``TARGET`` (a `hwopt.Target`); see hwopt.target."""
