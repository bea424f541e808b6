from recsys_tapper.cli import main

main()
