"""torchtune plug-ins, named by dotted path in the rendered torchtune configs."""
