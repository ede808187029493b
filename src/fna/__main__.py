from fna.cli import main

main()
