if header :contains "subject" "x" {
  fileinto "Junk"
}
