from saige_k8s.cli import main

main()
