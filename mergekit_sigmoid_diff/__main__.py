from mergekit_sigmoid_diff.cli import main

main()
