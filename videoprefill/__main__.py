from videoprefill.run import cli

cli()
